"""The shadow desk: pairing by offset, comparing, bounding, without a broker."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.lifecycle.shadow import ShadowDesk, compare
from pipeline.observability.metrics import Metrics
from pipeline.serving.outcomes import Outcome
from schemas.messages import SHADOW, SHADOWED, Envelope


def _outcome(offset: int, shadow: int, *, reason: str | None = None, **outputs: Any) -> Outcome:
    env = Envelope("in", 2, offset, b"k%d" % offset, b"", 0, 0.0, shadow=shadow)
    kept = {k: np.asarray(v) for k, v in outputs.items()} if reason is None else None
    return Outcome(env, "out", b"v", reason=reason, model="m", outputs=kept)


def test_outputs_are_compared_exactly_for_integers_and_within_tolerance_for_floats() -> None:
    live = _outcome(1, SHADOWED, classes=[3, 1], scores=[0.5, 0.25])
    assert (
        compare(live, _outcome(1, SHADOW, classes=[3, 1], scores=[0.5, 0.25005]), 1e-4)[0] == "same"
    )
    verdict, largest, differing = compare(
        live, _outcome(1, SHADOW, classes=[1, 3], scores=[0.5, 0.3]), 1e-4
    )
    assert verdict == "differs"
    assert differing == ["classes", "scores"]
    assert largest is not None
    assert abs(largest - 0.05) < 1e-6
    nan = compare(live, _outcome(1, SHADOW, classes=[3, 1], scores=[np.nan, 0.25]), 1e-4)
    assert nan[0] == "differs"
    missing = compare(live, _outcome(1, SHADOW, classes=[3, 1]), 1e-4)
    assert missing[2] == ["scores"]


def test_statuses_decide_before_outputs() -> None:
    ok = _outcome(1, SHADOWED, classes=[3])
    failed = _outcome(1, SHADOW, reason="inference_failed")
    assert compare(ok, failed, 1e-4)[0] == "status"
    both = compare(
        _outcome(1, SHADOWED, reason="bad_tensor"), _outcome(1, SHADOW, reason="bad_tensor"), 0
    )
    assert both[0] == "same"


def _desk(limit: int = 2) -> tuple[ShadowDesk, list[tuple[bytes | None, dict[str, Any]]], Metrics]:
    sent: list[tuple[bytes | None, dict[str, Any]]] = []
    metrics = Metrics()
    desk = ShadowDesk(
        {"m@1": ("m", "1"), "m@2": ("m", "2")},
        {"m": 1e-3},
        lambda key, value: sent.append((key, json.loads(value))),
        metrics,
        limit,
    )
    return desk, sent, metrics


def test_the_two_outcomes_of_a_record_are_paired_in_either_order_and_only_the_live_goes_on() -> (
    None
):
    desk, sent, metrics = _desk()
    out: list[Outcome] = []
    live_emit, shadow_emit = desk.tee(out.extend, "m@1"), desk.tee(out.extend, "m@2")
    assert desk.admit("m@2")
    assert desk.admit("m@2")
    plain = _outcome(9, 0, scores=[1.0])
    live_emit([plain, _outcome(5, SHADOWED, scores=[1.0])])
    shadow_emit([_outcome(5, SHADOW, scores=[1.5]), _outcome(6, SHADOW, scores=[2.0])])
    live_emit([_outcome(6, SHADOWED, scores=[2.0])])
    assert [o.envelope.offset for o in out] == [9, 5, 6]  # never a shadow's
    assert [(k, r["offset"], r["verdict"]) for k, r in sent] == [
        (b"k5", 5, "differs"),
        (b"k6", 6, "same"),
    ]
    assert sent[0][1] | {"max_abs_diff": 0.5} == {
        "model": "m", "live": "1", "shadow": "2", "topic": "in", "partition": 2, "offset": 5,
        "id": None, "verdict": "differs", "live_status": "OK", "shadow_status": "OK",
        "max_abs_diff": 0.5, "differing": ["scores"],
    }  # fmt: skip
    value = metrics.registry.get_sample_value
    assert value("kp_shadow_comparisons_total", {"model": "m@2", "verdict": "differs"}) == 1


def test_copies_stop_while_the_shadow_is_behind_and_resume_as_it_answers() -> None:
    desk, _, metrics = _desk(limit=2)
    assert desk.admit("m@2")
    assert desk.admit("m@2")
    assert not desk.admit("m@2")  # two outstanding: the third is not copied
    assert metrics.registry.get_sample_value("kp_shadow_skipped_total", {"model": "m@2"}) == 1
    desk.tee(lambda _: None, "m@2")([_outcome(1, SHADOW, scores=[0.0])])
    assert desk.admit("m@2")


def test_outcomes_whose_partner_never_comes_are_let_go() -> None:
    desk, sent, _ = _desk(limit=2)
    live = desk.tee(lambda _: None, "m@1")
    live([_outcome(i, SHADOWED, scores=[0.0]) for i in range(10)])
    assert len(desk._waiting) == 4  # limit × versions: the oldest are dropped
    desk.tee(lambda _: None, "m@2")([_outcome(9, SHADOW, scores=[0.0])])
    assert [r["offset"] for _, r in sent] == [9]

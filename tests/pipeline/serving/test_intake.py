"""Intake: every record becomes (model, batch key) with its request, or one dead letter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.serving.intake import Intake
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request
from schemas.tensors import TensorSpec

CODEC = AvroCodec()


def _intake() -> Intake:
    graph = [
        SimpleNamespace(
            name="m",
            settings=SimpleNamespace(version="3"),
            inputs={"x": TensorSpec("FP32", (4,))},
            bucketer=None,
        )
    ]
    return Intake(graph, CODEC, OutcomeEncoder(CODEC, "out", "dlq"))  # type: ignore[arg-type]


def _env(value: bytes) -> Envelope:
    return Envelope("in", 1, 9, b"k", value, 1_700_000_000_000, 0.0)


def _request(model: str = "m", x: Any = None) -> bytes:
    x = np.zeros(4, np.float32) if x is None else x
    return CODEC.encode_request(Request("r1", model, {"x": x}))


def test_a_servable_request_is_decoded_and_keyed() -> None:
    env = _env(_request())
    assert _intake().admit(env) == ("m", "m")
    assert env.request is not None
    assert env.request.id == "r1"


def test_an_already_decoded_request_is_not_decoded_again() -> None:
    env = _env(b"not avro")
    env.request = Request("r2", "m", {"x": np.ones(4, np.float32)})
    assert _intake().admit(env) == ("m", "m")


def test_what_cannot_be_served_is_one_dead_letter_with_its_reason() -> None:
    cases = {
        "bad_request": (_env(b""), True),  # a tombstone
        "undecodable": (_env(b"\x00\xff junk"), False),
        "unknown_model": (_env(_request(model="other")), False),
        "bad_tensor": (_env(_request(x=np.zeros(5, np.float32))), False),
    }
    for reason, (env, tombstone) in cases.items():
        out = _intake().admit(env, tombstone)
        assert isinstance(out, Outcome), reason
        assert (out.reason, out.topic) == (reason, "dlq")
        letter = CODEC.decode_dead_letter(out.value)
        assert (letter.topic, letter.partition, letter.offset) == ("in", 1, 9)


def test_a_batch_is_admitted_as_each_of_its_records_would_be() -> None:
    """One decode call for the batch; groups keep arrival order; letters keep theirs."""
    values = [
        _request(),
        b"\x00\xff junk",
        _request(model="other"),
        b"",
        _request(x=np.ones(4, np.float32)),
        _request(x=np.zeros(5, np.float32)),
    ]
    tombstones = {3}
    one_by_one = [_intake().admit(_env(v), i in tombstones) for i, v in enumerate(values)]
    rows = [_env(v) for v in values]
    for i, env in enumerate(rows):
        env.offset = i
    groups, letters = _intake().admit_batch(rows, tombstones)
    assert list(groups) == [("m", "m")]
    assert [env.offset for env in groups[("m", "m")]] == [0, 4]
    assert all(env.request is not None for env in groups[("m", "m")])
    expected = [a.reason for a in one_by_one if isinstance(a, Outcome)]
    assert [out.reason for out in letters] == expected
    assert expected == ["undecodable", "unknown_model", "bad_request", "bad_tensor"]
    assert [CODEC.decode_dead_letter(out.value).offset for out in letters] == [1, 2, 3, 5]

"""The reorder buffer: any completion order in, offset order per key or partition out.

Hypothesis draws rows over two partitions and a few keys (some records keyless), admits
them as consumed batches split over groups, then hands their outcomes back in any order,
in chunks, and checks after every chunk that exactly the completed prefix of each
sequence has been released, in offset order, each outcome once.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine.ordering import Sequencer
from pipeline.observability.metrics import Metrics
from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope


def _env(partition: int, offset: int, key: bytes | None, generation: int = 1) -> Envelope:
    return Envelope("in", partition, offset, key, b"", 0, 0.0, generation)


def _outcome(env: Envelope) -> Outcome:
    return Outcome(env, "out", b"%d" % env.offset, model="m")


def _sequence(env: Envelope, how: str) -> tuple[Any, ...] | None:
    if how == "key":
        return None if env.key is None else (env.partition, env.key)
    return (env.partition,)


@st.composite
def traffic(draw: st.DrawFn) -> tuple[list[Envelope], list[list[Envelope]], list[int], int]:
    n = draw(st.integers(1, 60))
    rows, next_offset = [], [0, 0]
    for _ in range(n):
        p = draw(st.integers(0, 1))
        next_offset[p] += draw(st.integers(1, 3))  # gaps: compacted topics
        rows.append(_env(p, next_offset[p], draw(st.sampled_from([None, b"a", b"b", b"c"]))))
    # consumed batches, each split over up to 3 groups (batch keys: shape buckets)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4))) if n > 1 else []
    batches = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    groups = [draw(st.integers(1, 3)) for _ in batches]
    seed = draw(st.integers(0, 2**32 - 1))
    return rows, batches, groups, seed


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(traffic(), st.sampled_from(["key", "partition"]), st.integers(1, 8))
def test_any_completion_order_is_published_in_offset_order_per_sequence(
    drawn: tuple[list[Envelope], list[list[Envelope]], list[int], int], how: str, chunk: int
) -> None:
    rows, batches, group_counts, seed = drawn
    rng = random.Random(seed)
    seq = Sequencer({"m": how, "other": "none"})
    for batch, count in zip(batches, group_counts, strict=True):
        groups: dict[tuple[str, Any], list[Envelope]] = defaultdict(list)
        for env in batch:  # each group keeps the batch's order, as Intake's do
            groups[("m", rng.randrange(count))].append(env)
        seq.admit_groups(groups)
    done = list(rows)
    rng.shuffle(done)
    released: list[Envelope] = []
    finished: set[int] = set()
    for start in range(0, len(done), chunk):
        part = done[start : start + chunk]
        finished |= {id(e) for e in part}
        out = seq.release(_outcome(e) for e in part)
        released += [o.envelope for o in out]
        # exactly each sequence's completed prefix is out by now, and unsequenced rows
        by_sequence: dict[Any, list[Envelope]] = defaultdict(list)
        for env in rows:
            by_sequence[_sequence(env, how)].append(env)
        expected: set[int] = set()
        for name, envs in by_sequence.items():
            for env in envs:
                if id(env) not in finished:
                    if name is not None:
                        break
                    continue
                expected.add(id(env))
        assert {id(e) for e in released} == expected
    assert len(released) == len(rows) == len({id(e) for e in released})
    for name in {_sequence(e, how) for e in rows} - {None}:
        offsets = [e.offset for e in released if _sequence(e, how) == name]
        assert offsets == sorted(offsets)
    assert seq.held == 0
    assert seq.held_by_model() == {"m": 0}


def test_an_unordered_model_and_unknown_rows_pass_straight_through() -> None:
    seq = Sequencer({"m": "none", "k": "key"})
    assert not Sequencer({"m": "none"})
    envs = [_env(0, i, b"x") for i in range(3)]
    seq.admit("m", envs)
    out = seq.release([_outcome(e) for e in reversed(envs)])
    assert [o.envelope.offset for o in out] == [2, 1, 0]


def test_keyless_rows_of_a_key_model_are_not_held_and_are_counted() -> None:
    metrics = Metrics()
    seq = Sequencer({"k": "key"}, metrics)
    envs = [_env(0, 1, b"a"), _env(0, 2, None), _env(0, 3, b"a")]
    seq.admit("k", envs)
    out = seq.release([_outcome(envs[2]), _outcome(envs[1])])
    assert [o.envelope.offset for o in out] == [2]  # offset 3 waits for offset 1
    assert seq.held == 1
    assert metrics.reorder_unkeyed.labels("k")._value.get() == 1
    assert seq.held_by_model() == {"k": 1}
    assert metrics.reorder_held.labels("k")._value.get() == 1
    out = seq.release([_outcome(envs[0])])
    assert [o.envelope.offset for o in out] == [1, 3]
    waited = {s.name: s.value for m in metrics.reorder_wait.collect() for s in m.samples}
    assert waited["kp_reorder_wait_seconds_count"] == 2


@pytest.mark.parametrize("how", ["key", "partition"])
def test_partitions_let_go_drop_their_sequences_and_what_they_hold(how: str) -> None:
    seq = Sequencer({"m": how})
    envs = [_env(0, 1, b"a"), _env(0, 2, b"a"), _env(1, 1, b"a"), _env(1, 2, b"a")]
    seq.admit("m", envs)
    assert seq.release([_outcome(envs[1]), _outcome(envs[3])]) == []
    assert seq.held == 2
    seq.forget([("in", 0)])
    assert seq.held == 1
    # a late outcome of the dropped partition is no longer sequenced: it passes
    assert [o.envelope for o in seq.release([_outcome(envs[0])])] == [envs[0]]
    assert [o.envelope for o in seq.release([_outcome(envs[2])])] == [envs[2], envs[3]]
    assert seq.held == 0


def test_a_reassigned_partition_starts_new_sequences() -> None:
    """The same offsets under a new generation are other rows, not the old ones."""
    seq = Sequencer({"m": "partition"})
    old = [_env(0, 1, None, generation=1), _env(0, 2, None, generation=1)]
    seq.admit("m", old)
    seq.forget([("in", 0)])
    new = [_env(0, 1, None, generation=2), _env(0, 2, None, generation=2)]
    seq.admit("m", new)
    assert seq.release([_outcome(new[1])]) == []
    assert [o.envelope for o in seq.release([_outcome(new[0])])] == new

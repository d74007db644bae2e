"""Control records and the commands that make them, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config.topology import Topology
from pipeline.lifecycle.admin import canary, promote, rollback, shadow
from pipeline.lifecycle.commands import (
    ControlRecord,
    Split,
    checked_split,
    control_topic,
    initial_splits,
)
from schemas.errors import ConfigError


def _topology(versions: tuple[str, ...] = ("1", "2", "3"), **topics: Any) -> Topology:
    return Topology.model_validate(
        {
            "kafka": {"group_id": "fraud scoring"},
            "topics": {"input": ["in"], "output": "out", "dead_letter": "dlq", **topics},
            "versions": {"m": {"default": "1"}} if len(versions) > 1 else {},
            "models": [
                {
                    "name": "m",
                    "version": v,
                    "backend": "onnxruntime",
                    "artifact": f"m{v}.onnx",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                }
                for v in versions
            ],
        }
    )


NOW = ControlRecord("m", Split("1", {"3": 0.1}), 4, "canary 3 0.1", Split("1"), "ops@host", 7)


def test_a_record_reads_back_as_written() -> None:
    assert ControlRecord.decode(NOW.encode()) == NOW
    shadowed = ControlRecord("m", Split("1", {}, ("2", 0.5)), 2, "shadow 2 0.5", Split("1"))
    assert ControlRecord.decode(shadowed.encode()) == shadowed
    assert shadowed.split.describe() == "v1 (default), shadow v2 50%"
    first = ControlRecord("m", Split("2"), 1, "promote 2")
    assert ControlRecord.decode(first.encode()) == first


@pytest.mark.parametrize(
    "value", [b"", b"{", b"[]", b'{"model": "m"}', b'{"model": "m", "split": {}, "seq": 1}']
)
def test_what_is_not_a_record_is_refused_saying_so(value: bytes) -> None:
    with pytest.raises(ValueError, match="not a control record"):
        ControlRecord.decode(value)


def test_before_any_command_the_state_is_the_topologys_own() -> None:
    assert initial_splits(_topology()) == {"m": ControlRecord("m", Split("1"), 0, "topology")}
    assert initial_splits(_topology(("5",)))["m"].split == Split("5")


def test_the_control_topic_is_named_after_the_group_unless_set() -> None:
    assert control_topic(_topology()) == "fraud_scoring.control"
    assert control_topic(_topology(control="ops.versions")) == "ops.versions"


def test_commands_change_the_split_as_their_names_say() -> None:
    made = ControlRecord.made("m", promote("3")(NOW), NOW, "promote 3")
    assert made.split == Split("3")  # its canary ends: it is the default now
    assert made.seq == 5
    assert made.previous == NOW.split
    assert "@" in made.by
    assert canary("2", 0.25)(NOW) == Split("1", {"3": 0.1, "2": 0.25})
    assert canary("3", 0)(NOW) == Split("1")
    assert rollback(NOW) == Split("1")
    assert shadow("2", 1.0)(NOW) == Split("1", {"3": 0.1}, ("2", 1.0))
    assert shadow("2", 0)(NOW) == Split("1", {"3": 0.1})
    assert promote("2")(ControlRecord("m", Split("1", {}, ("2", 1.0)), 1, "")) == Split("2")
    assert canary("3", 0.2)(ControlRecord("m", Split("1", {}, ("2", 1.0)), 1, "")).shadow
    with pytest.raises(ConfigError, match="1 is the default already"):
        canary("1", 0.5)(NOW)
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback(ControlRecord("m", Split("1"), 0, "topology"))


@pytest.mark.parametrize(
    ("split", "words"),
    [
        (Split("4"), "model 'm' version 4 is not loaded by this topology (it serves 1, 2, 3)"),
        (Split("1", {"2": 0.7, "3": 0.6}), "the shares add up to 1.3"),
        (Split("1", {"1": 0.5}), "'1' is the default and a canary"),
        (Split("1", {"2": -0.1}), "share -0.1 is not above 0"),
        (Split("1", {}, ("1", 1.0)), "'1' is the default and its shadow"),
        (Split("1", {}, ("2", 1.5)), "shadow share 1.5 is not above 0"),
        (Split("1", {}, ("4", 1.0)), "version 4 is not loaded"),
    ],
)
def test_a_split_the_topology_cannot_serve_is_refused_before_it_is_written(
    split: Split, words: str
) -> None:
    with pytest.raises(ConfigError) as e:
        checked_split(_topology(), "m", split, "versions promote 4")
    assert str(e.value).startswith("versions promote 4: ")
    assert words in str(e.value)
    with pytest.raises(ConfigError, match=r"no model 'k' in this topology \(serving m\)"):
        checked_split(_topology(), "k", Split("1"))

"""Control records and the commands that make them, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config.topology import Topology
from pipeline.lifecycle.admin import canary, load, promote, rollback, shadow, unload
from pipeline.lifecycle.commands import (
    ControlRecord,
    Load,
    Served,
    Split,
    checked_served,
    checked_split,
    control_topic,
    initial_splits,
    served_versions,
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
        (Split("4"), "model 'm' version 4 is not loaded (the group serves 1, 2, 3)"),
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


def test_served_versions_travel_with_every_record_until_changed() -> None:
    loaded = Served({"4": Load("m4.onnx", "1", "ab" * 32)}, ("2",))
    record = ControlRecord("m", Split("1"), 3, "load 4", Split("1"), "ops", 9, loaded)
    assert ControlRecord.decode(record.encode()) == record
    # A record written before versions could be loaded reads as serving none extra.
    old = b'{"model":"m","split":{"default":"1"},"seq":1}'
    assert ControlRecord.decode(old).served == Served()
    promoted = ControlRecord.made("m", Split("4"), record, "promote 4")
    assert promoted.served == loaded  # a split command keeps what is served
    assert served_versions(_topology(), "m", loaded) == ["1", "3", "4"]
    assert loaded.describe() == "loaded v4 (m4.onnx), unloaded v2"


def test_load_and_unload_change_what_is_served_and_refuse_what_cannot_be() -> None:
    topology = _topology()
    start = ControlRecord("m", Split("1"), 0, "topology")
    served = load(topology, "4", "m4.onnx")(start)
    assert served == Served({"4": Load("m4.onnx", "1")})  # settings of the default
    assert load(topology, "4", "m4.onnx", settings_of="3")(start).loads["4"].settings_of == "3"
    with_four = ControlRecord("m", Split("1"), 1, "load 4", None, "", 0, served)
    assert unload(topology, "4")(with_four) == Served()
    assert unload(topology, "2")(with_four) == Served(served.loads, ("2",))
    gone = ControlRecord("m", Split("1"), 2, "unload 2", None, "", 0, Served({}, ("2",)))
    assert load(topology, "2", None)(gone) == Served()  # a topology version, back
    refusals = [
        (lambda: load(topology, "3", None)(start), "3 of 'm' is served already"),
        (lambda: load(topology, "4", None)(start), "version 4 is new: name its file"),
        (lambda: load(topology, "2", "x.onnx")(gone), "the topology's own; leave --artifact"),
        (lambda: unload(topology, "9")(start), "9 of 'm' is not served"),
    ]
    for call, words in refusals:
        with pytest.raises(ConfigError, match=words):
            call()


@pytest.mark.parametrize(
    ("served", "words"),
    [
        (Served({}, ("1",)), "version 1 of 'm' takes traffic (v1 (default), v3 10%)"),
        (Served({}, ("1", "2", "3")), "takes traffic"),
        (Served({"5": Load("m5.onnx", "7")}), "--settings-of '7' is not a version of 'm'"),
        (Served({}, ("8",)), "version 8 is not in the topology"),
    ],
)
def test_served_versions_that_would_break_the_split_are_refused(served: Served, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        checked_served(_topology(), "m", served, NOW.split, "versions unload 1")
    assert words in str(e.value)

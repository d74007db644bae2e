"""The embedded broker's process lifecycle: one Tansu per broker, gone after stop."""

from __future__ import annotations

import os

import pytest

from pipeline.kafka.broker import EmbeddedBroker


def test_entering_a_started_broker_starts_no_second_process() -> None:
    with EmbeddedBroker().start() as broker:
        first = broker.pid
        assert first is not None
        assert broker.start().pid == first  # started already: the same process
    assert not broker.running
    with pytest.raises(ProcessLookupError):  # signal 0 asks whether the pid is alive
        os.kill(first, 0)

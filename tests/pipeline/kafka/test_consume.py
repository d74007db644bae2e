"""consume_available: what librdkafka holds at once, else the first record to come."""

from __future__ import annotations

from typing import Any

from pipeline.kafka.consume import consume_available


class Queue:
    """A consumer double: ``ready`` is what librdkafka holds now, ``coming`` what arrives
    while a caller waits (all at once, as one fetch brings them)."""

    def __init__(self, ready: list[str], coming: list[str]) -> None:
        self.ready, self.coming = ready, coming
        self.calls: list[tuple[str, int, float]] = []

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.calls.append(("consume", n, timeout))
        taken, self.ready = self.ready[:n], self.ready[n:]
        return taken

    def poll(self, timeout: float) -> Any:
        self.calls.append(("poll", 1, timeout))
        self.ready, self.coming = self.ready + self.coming, []
        return self.ready.pop(0) if self.ready else None


def test_what_is_there_is_taken_without_waiting() -> None:
    q = Queue(["a", "b", "c"], ["late"])
    assert consume_available(q, 2, 0.01) == ["a", "b"]  # type: ignore[arg-type]
    assert q.calls == [("consume", 2, 0)]


def test_with_nothing_there_the_first_to_come_and_its_fetch_are_taken() -> None:
    q = Queue([], ["a", "b", "c"])
    assert consume_available(q, 2, 0.01) == ["a", "b"]  # type: ignore[arg-type]
    assert q.calls == [("consume", 2, 0), ("poll", 1, 0.01), ("consume", 1, 0)]
    assert q.ready == ["c"]


def test_nothing_coming_is_an_empty_list_after_the_wait() -> None:
    q = Queue([], [])
    assert consume_available(q, 2000, 0.01) == []  # type: ignore[arg-type]
    assert q.calls == [("consume", 2000, 0), ("poll", 1, 0.01)]


def test_no_wait_never_blocks_and_one_record_is_one_call() -> None:
    q = Queue([], ["a"])
    assert consume_available(q, 5, 0) == []  # type: ignore[arg-type]
    assert q.calls == [("consume", 5, 0)]
    assert consume_available(q, 1, 0.5) == ["a"]  # type: ignore[arg-type]
    assert q.calls[1:] == [("consume", 1, 0), ("poll", 1, 0.5)]

"""The serving GC policy: applied while any replica serves, the process's own afterwards."""

from __future__ import annotations

import gc
import threading

from pipeline.engine.collector import YOUNG_THRESHOLD, serving_collector


def test_threshold_and_freeze_inside_and_restored_after() -> None:
    before = gc.get_threshold()
    with serving_collector():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_nested_blocks_restore_only_when_the_last_leaves() -> None:
    before = gc.get_threshold()
    with serving_collector():
        with serving_collector():
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the outer one still serves
    assert gc.get_threshold() == before


def test_restored_when_the_block_raises() -> None:
    before = gc.get_threshold()
    try:
        with serving_collector():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_concurrent_replicas_share_the_policy() -> None:
    before = gc.get_threshold()
    inside, release = threading.Barrier(3), threading.Event()

    def serve() -> None:
        with serving_collector():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    release.set()
    for t in threads:
        t.join()
    assert gc.get_threshold() == before


def test_cyclic_garbage_made_while_serving_is_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    with serving_collector():
        ref = __import__("weakref").ref(Node())
        assert ref() is not None  # a cycle: reference counting alone cannot free it
        gc.collect()
        assert ref() is None

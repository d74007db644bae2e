"""Exactly-once on a broker that hides aborted transactions (noida-db): zombies are fenced.

A replica that stalls (SIGSTOP: a long GC pause, a frozen VM) is replaced by a new one
with the same replica id; when the stalled one wakes, its next transactional call finds a
newer producer epoch: it stops with an error that says so, and a read_committed reader
never sees an outcome twice.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from e2e.kit import (
    OutcomeCounter,
    PacedProducer,
    committed_offsets,
    end_offsets,
    new_topics,
    read_outcomes,
    spawn_run,
    wait_for,
    write_tiny_topology,
)

from pipeline.kafka.clients import ensure_topics

N = 8000


def test_a_stalled_replica_is_fenced_by_its_successor_and_nothing_is_seen_twice(
    noida: Any, tmp_path: Path
) -> None:
    settings = dict(noida.client_settings)
    topics = new_topics()
    admin = AdminClient({"bootstrap.servers": noida.bootstrap_servers})
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter], 4, 1)
    topology = write_tiny_topology(
        tmp_path / "tiny.yaml",
        topics,
        batch=16,
        delivery="exactly_once",
        consumer=settings,
        static=True,  # the successor takes the zombie's place in the group at once
    )
    # Progress only; the verdict is what a transactional reader sees after the run.
    counter = OutcomeCounter(
        noida.bootstrap_servers,
        topics,
        settings={**settings, "isolation.level": "read_uncommitted"},
    )
    env = {**os.environ, "KP_REPLICA_ID": "replica-a"}
    logs = [tmp_path / "zombie.log", tmp_path / "successor.log"]

    # Traffic in chunks until the zombie has gone: each replica serves requests.
    producer = PacedProducer(noida, topics.input, N, chunk=N // 20, every_s=0.5)
    zombie = spawn_run(topology, noida, logs[0], env=env)
    successor = None
    try:
        wait_for(lambda: len(counter.ids) >= 500, 60, "the first replica serving")
        zombie.send_signal(signal.SIGSTOP)
        successor = spawn_run(topology, noida, logs[1], env=env)
        # The successor fences the zombie's producer at start, and gets its partitions
        # once the group drops the silent member (session.timeout.ms).
        mark = len(counter.ids)
        wait_for(lambda: len(counter.ids) >= mark + 500, 90, "the successor serving")
        zombie.send_signal(signal.SIGCONT)
        zombie_code = zombie.wait(60)
        total = producer.finish()
        wait_for(lambda: len(counter.ids) >= total, 60, f"an outcome for each of {total}")
    finally:
        producer.finish()
        if zombie.poll() is None:
            zombie.send_signal(signal.SIGCONT)
            zombie.kill()
        if successor is not None:
            successor.send_signal(signal.SIGTERM)
            successor_code = successor.wait(60)
        counter.stop()
    zombie_log = logs[0].read_text()
    assert zombie_code != 0, zombie_log[-3000:]
    assert "fenced" in zombie_log, zombie_log[-3000:]
    assert successor_code == 0, logs[1].read_text()[-3000:]
    assert committed_offsets(noida, topics.group, topics.input) == end_offsets(noida, topics.input)
    final = read_outcomes(noida, topics, total)
    assert final.ids == producer.ids
    assert final.duplicates == 0

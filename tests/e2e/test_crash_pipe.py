"""Killing `kp-pipeline run` with SIGKILL at random moments loses nothing; SIGTERM drains.

Each kill lands at a random moment after the replica has its partitions, while requests
still arrive: a kill during start-up would prove little, and on Tansu (a restarted
replica's join took 6 s) kills timed from the spawn all landed before it had served a
request. At-least-once runs on the embedded Tansu broker. Exactly-once runs on noida-db,
which hides aborted transactions from read_committed readers (Tansu does not, see
test_brokers_pipe), so a crash's aborted transaction is really invisible there. The
verdict is what a read_committed reader sees from the beginning after the run
(`read_outcomes`): on noida-db a reader that follows the run stops seeing a restarted
replica's results after its first aborted transaction.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from e2e.kit import (
    OutcomeCounter,
    PacedProducer,
    committed_offsets,
    end_offsets,
    new_topics,
    produce_tiny,
    read_outcomes,
    spawn_run,
    tiny_vectors,
    wait_for,
    write_tiny_topology,
)

from pipeline.kafka.clients import ensure_topics

N = 20_000
KILLS = 5
MAX_IN_FLIGHT = 2048
ASSIGNED = "pipeline.engine.loop: assigned "


def _settings(broker: Any) -> dict[str, Any]:
    return dict(getattr(broker, "client_settings", {}))


def _kill_replicas(
    topology: Path, broker: Any, log: Path, env: dict[str, str], counter: OutcomeCounter
) -> list[tuple[int, int]]:
    """Start a replica, SIGKILL it at a random moment after it has its partitions; KILLS
    times. Returns the requests answered when each was assigned and when it was killed."""
    rng = random.Random(5)
    lives: list[tuple[int, int]] = []
    for kill in range(KILLS):
        assignments = log.read_text().count(ASSIGNED) if log.exists() else 0
        replica = spawn_run(topology, broker, log, env=env)
        wait_for(
            lambda: log.read_text().count(ASSIGNED) > assignments,  # noqa: B023
            60,
            f"replica {kill + 1}'s partitions",
        )
        answered = len(counter.ids)
        time.sleep(rng.uniform(0.1, 2.0))
        replica.send_signal(signal.SIGKILL)
        replica.wait(10)
        lives.append((answered, len(counter.ids)))
        with log.open("a") as f:
            f.write(f"--- SIGKILL {kill + 1}: answered {lives[-1]} (assigned, killed)\n")
    return lives


@pytest.mark.parametrize(
    ("delivery", "broker_fixture"),
    [("at_least_once", "broker"), ("exactly_once", "noida")],
    ids=["at_least_once-tansu", "exactly_once-noida"],
)
def test_sigkill_at_five_random_moments_loses_nothing(
    delivery: str, broker_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    broker = request.getfixturevalue(broker_fixture)
    settings = _settings(broker)
    topics = new_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter], 4, 1)
    topology = write_tiny_topology(
        tmp_path / "tiny.yaml",
        topics,
        batch=16,
        max_in_flight=MAX_IN_FLIGHT,
        delivery=delivery,
        consumer=settings,
        static=True,  # restarted under one name: back in the group without a rebalance
    )
    log = tmp_path / "run.log"
    # Progress only (it counts aborted outcomes too); the verdict is read_outcomes'.
    counter = OutcomeCounter(
        broker.bootstrap_servers,
        topics,
        settings={**settings, "isolation.level": "read_uncommitted"},
    )
    # Restarted under the same name, as a StatefulSet pod or a restarted container is:
    # the same static group member and the same transactional producer.
    env = {**os.environ, "KP_REPLICA_ID": "replica-0"}
    # ~400 requests/s while the kills go on, however long slow replica starts make them
    # take (a group join on Tansu took 6 s); the rest of N at once after the last kill.
    producer = PacedProducer(broker, topics.input, N, chunk=100, every_s=0.25)
    try:
        lives = _kill_replicas(topology, broker, log, env, counter)
        total = producer.finish()
        last = spawn_run(topology, broker, log, env=env)
        try:
            wait_for(lambda: len(counter.ids) >= total, 240, f"an outcome for each of {total}")
            ends = end_offsets(broker, topics.input)
            wait_for(
                lambda: committed_offsets(broker, topics.group, topics.input) == ends,
                60,
                "offsets committed up to the end of the input",
            )
        finally:
            last.send_signal(signal.SIGTERM)
            code = last.wait(60)
    finally:
        producer.finish()
        counter.stop()
    assert code == 0, log.read_text()[-3000:]
    # Each replica served before its kill: the kills cut serving replicas short.
    assert all(killed > assigned for assigned, killed in lives), lives
    # What a transactional reader sees: aborted outcomes of killed replicas are hidden.
    final = read_outcomes(broker, topics, total)
    assert final.ids == producer.ids
    assert not final.dead_letters
    if delivery == "exactly_once":
        assert final.duplicates == 0, final.duplicates
        # Every restart came back as the same transactional producer, fencing the last.
        ids = re.findall(r"exactly-once: transactional id (\S+)", log.read_text())
        assert len(ids) >= 2, log.read_text()[-3000:]
        assert len(set(ids)) == 1, ids
    else:
        # Each kill repeats at most what was in flight, plus what was acknowledged since
        # the last commit (one 200 ms interval, ~4k at ~20k requests/s).
        assert final.duplicates <= KILLS * (MAX_IN_FLIGHT + 4000), final.duplicates
    print(
        f"{delivery}: {total} requests, {final.duplicates} duplicates after {KILLS} kills;"
        f" answered {lives}"
    )


def test_sigterm_drains_and_commits_everything_it_delivered(broker: Any, tmp_path: Path) -> None:
    """After SIGTERM (exit 0) every delivered outcome's offset is committed, so the next
    replica starts exactly where this one stopped: not one duplicate, even at-least-once."""
    topics = new_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter], 4, 1)
    topology = write_tiny_topology(tmp_path / "tiny.yaml", topics, batch=16)
    log = tmp_path / "run.log"
    n = 60_000  # ~1.5 s of work here: SIGTERM lands midway
    produce_tiny(broker, topics.input, tiny_vectors(n))
    counter = OutcomeCounter(broker.bootstrap_servers, topics)
    try:
        first = spawn_run(topology, broker, log)
        wait_for(lambda: len(counter.ids) >= 500, 60, "the first results")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0, log.read_text()[-3000:]
        time.sleep(1.0)
        delivered = dict(counter.sources)
        committed = committed_offsets(broker, topics.group, topics.input)
        for partition in range(4):
            served = sorted(o for p, o in delivered if p == partition)
            # Contiguous from 0 and committed up to exactly the last one served.
            assert served == list(range(len(served)))
            if served:
                assert committed[partition] == len(served)
        assert len(counter.ids) < n, "SIGTERM must land before the end"

        second = spawn_run(topology, broker, log)
        wait_for(lambda: len(counter.ids) >= n, 120, f"an outcome for each of {n} requests")
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        counter.stop()
    assert counter.duplicates == 0
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )

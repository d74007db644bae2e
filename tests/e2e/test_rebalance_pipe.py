"""Replicas joining and leaving mid-run: partitions move incrementally, nothing is lost.

On revoke a replica finishes and commits the moving partitions' in-flight work before
letting them go (cooperative-sticky), so the next owner starts exactly where it stopped:
graceful joins and leaves cause no duplicates at all, and the first replica keeps
serving the partitions that do not move.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
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

N = 20_000  # at least: traffic goes on until the last replica has left
PARTITIONS = 6


@pytest.mark.parametrize(
    ("delivery", "broker_fixture", "assignor"),
    [
        ("at_least_once", "broker", "cooperative-sticky"),
        # noida-db never completes the cooperative protocol's second join (the new member
        # waits forever), so exactly-once runs there with the eager protocol: every
        # partition is revoked, finished and committed at each rebalance.
        ("exactly_once", "noida", "range"),
    ],
    ids=["at_least_once-tansu-cooperative", "exactly_once-noida-eager"],
)
def test_second_and_third_replicas_join_and_leave_mid_run(
    delivery: str,
    broker_fixture: str,
    assignor: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    broker = request.getfixturevalue(broker_fixture)
    settings = dict(getattr(broker, "client_settings", {}))
    cooperative = assignor == "cooperative-sticky"
    topics = new_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter], PARTITIONS, 1)
    # Batches that wait up to 300 ms: a revoke always finds requests of the moving
    # partitions in open batches and in flight, which it must run and commit first.
    topology = write_tiny_topology(
        tmp_path / "tiny.yaml",
        topics,
        batch=1024,
        delay_ms=300,
        delivery=delivery,
        consumer={**settings, "partition.assignment.strategy": assignor},
    )
    logs = [tmp_path / f"replica-{i}.log" for i in range(3)]
    # Progress only; the verdict is what a transactional reader sees after the run.
    counter = OutcomeCounter(
        broker.bootstrap_servers,
        topics,
        PARTITIONS,
        settings={**settings, "isolation.level": "read_uncommitted"},
    )
    env_of = [{"KP_REPLICA_ID": f"r{i}"} for i in range(3)]
    replicas: list[subprocess.Popen[bytes]] = []

    def spawn(i: int) -> None:
        replicas.append(spawn_run(topology, broker, logs[i], env={**os.environ, **env_of[i]}))

    def answered() -> int:
        return len(counter.ids)

    # ~670 requests/s in chunks closer together than the batches' 300 ms delay: whenever
    # a revoke comes, open batches hold requests of the moving partitions.
    producer = PacedProducer(broker, topics.input, N, chunk=100, every_s=0.15)
    try:
        spawn(0)
        wait_for(lambda: answered() >= 1000, 60, "the first replica serving")
        for i in (1, 2):  # join, one after the other, while traffic flows
            spawn(i)
            mark = answered()
            wait_for(lambda i=i: "assigned" in logs[i].read_text(), 60, f"replica {i} assigned")
            wait_for(lambda m=mark: answered() >= m + 1000, 60, "progress after the join")
        for i in (2, 1):  # and leave again, gracefully
            replicas[i].send_signal(signal.SIGTERM)
            assert replicas[i].wait(60) == 0, logs[i].read_text()[-3000:]
            mark = answered()
            wait_for(lambda m=mark: answered() >= m + 500, 60, "progress after leaving")
        total = producer.finish()
        wait_for(lambda: answered() >= total, 180, f"an outcome for each of {total} requests")
    finally:
        for r in replicas:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
        codes = [r.wait(60) for r in replicas]
        producer.finish()
        counter.stop()
    assert codes == [0, 0, 0], logs[0].read_text()[-3000:]
    final = read_outcomes(broker, topics, total, PARTITIONS)
    assert final.ids == producer.ids
    print(f"{delivery}: {total} requests, {final.duplicates} duplicates through 4 rebalances")
    check_duplicates(final, logs)
    first = logs[0].read_text()
    # Incremental: the first replica gave up only some partitions, never all of them.
    revokes = re.findall(r"revoked (.*) after finishing (\d+) in-flight", first)
    assert revokes, first[-2000:]
    if cooperative:
        assert all(len(r.split(", ")) < PARTITIONS for r, _ in revokes[:-1])  # last: exit
    # The moving partitions' open batches ran before they went (counted, not timed: the
    # tiny model finishes a batch in well under a millisecond).
    finished = [
        int(n)
        for log in logs
        for n in re.findall(r"after finishing (\d+) in-flight", log.read_text())
    ]
    if cooperative:
        # Under the eager protocol on noida-db the revokes found nothing in flight in every
        # run (fetching stops when the rebalance starts, and open batches flush meanwhile),
        # so only the cooperative case shows work finished at revoke.
        assert any(finished), finished
    for log in logs:  # every revoke finished its work within the timeout
        assert "left to the next owner" not in log.read_text()
    assert committed_offsets(broker, topics.group, topics.input, PARTITIONS) == end_offsets(
        broker, topics.input
    )


def check_duplicates(final: OutcomeCounter, logs: list[Path]) -> None:
    """None, unless Tansu took partitions from a member (see `lost_partitions`).

    Then at-least-once serves the lost partitions' uncommitted work again: only those
    partitions may show an outcome twice.
    """
    lost = lost_partitions(logs)
    if not lost:
        assert final.duplicates == 0
        return
    repeated = {partition for (partition, _), n in final.sources.items() if n > 1}
    print(f"Tansu took partitions {sorted(lost)} from a member; repeated: {sorted(repeated)}")
    assert repeated <= lost


def lost_partitions(logs: list[Path]) -> set[int]:
    """Partitions librdkafka declared lost in a replica (our loop logs each "lost").

    Tansu 0.6 answers a follower's SyncGroup by looking at the group once a second, so
    when the leader syncs and at once rejoins (cooperative-sticky's second join, after
    the leader revoked some partitions) the follower misses its assignment, waits
    0.8 x session.timeout.ms and is told to rejoin; meanwhile Tansu has formed the next
    generation without it. Read in the replicas' librdkafka logs (debug=cgrp) of failing
    runs: the follower's commits, queued behind that SyncGroup, were refused with
    ILLEGAL_GENERATION, and librdkafka declared the assignment lost when it handled a
    refusal before its rejoin (in most runs the rejoin goes first and nothing is lost).
    One CI run showed a loss with no refused commit logged before it, so any loss the
    client declares counts here, and only its partitions may be served twice.
    """
    lost: set[int] = set()
    for log in logs:
        for names in re.findall(r"WARNING pipeline\.engine\.loop: lost ([^\n]*)", log.read_text()):
            lost |= {int(p) for p in re.findall(r"\[(\d+)\]", names)}
    return lost

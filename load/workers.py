"""The tiny model with 1 and 2 workers side by side, serving and replaying.

    python -m load.workers [--workers 1,2] [--requests 100000] [--replay-requests 200000]

One embedded broker; the requests are produced once per part, then each variant reads
them with its own group, in turn (never at once: they would share the cores):

* serving: `kp-pipeline run load/topologies/tiny-mlp.yaml --workers W` on the backlog.
  The rate is taken from the moment the group's ``/readyz`` is 200 (every worker has its
  partitions) to the last outcome, from the group's own ``/metrics``
  (``kp_results_total`` + ``kp_dead_letters_total``), so start-up and the group join are
  not in it; what was served before that moment is left out of the count too.
* replay: `kp-pipeline replay … --from-offset 0 --output …` with ``--workers W``, and as
  two ``--shared`` replicas started separately; wall time of the whole command (start-up
  and joins included), and the output read back: every request exactly once.

Figures from a shared 2-core machine are indicative only; compare them within one run.
The host path is the limit on the tiny model (issue 16), so W workers can scale up to the
cores the machine has left after the broker and this process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from confluent_kafka.admin import AdminClient

from load.backlog import produce_tiny, scrape, total
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.traffic import read_topic
from schemas.codec import AvroCodec

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"
PARTITIONS = 4


def _env(bootstrap: str, tag: str, source: str) -> dict[str, str]:
    return {
        **os.environ,
        "KP_BOOTSTRAP": bootstrap,
        "KP_GROUP": f"{tag}.group",
        "KP_INPUT": source,
        "KP_OUTPUT": f"{tag}.results",
        "KP_DLQ": f"{tag}.dead-letters",
    }


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def serve(bootstrap: str, source: str, n: int, workers: int) -> float:
    """Requests/s of ``run --workers`` on a backlog of ``n``, once every worker is assigned."""
    tag = f"bench.workers.serve.{workers}.{time.time_ns()}"
    env = _env(bootstrap, tag, source)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, [env["KP_OUTPUT"], env["KP_DLQ"]], PARTITIONS, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(TOPOLOGY), "--bootstrap", bootstrap,
         "--metrics-port", str(port), *(["--workers", str(workers)] if workers > 1 else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        return saturation(url, proc, n, f"--workers {workers}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def saturation(url: str, proc: subprocess.Popen[bytes], n: int, what: str) -> float:
    """Requests/s of a pipeline at ``url`` on a backlog of ``n``, from its ``/readyz`` on.

    What it served before it was ready (start-up, the group join) is left out.
    """
    deadline = time.monotonic() + 180
    while _get(f"{url}/readyz") != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what}: not ready within 180 s")
        time.sleep(0.02)
    started, before = time.monotonic(), _done(url)
    done = before
    while done < n:
        if time.monotonic() > deadline + 600:
            raise RuntimeError(f"{what}: {done:.0f} of {n} after 10 minutes")
        time.sleep(0.05)
        done = _done(url)
    return (n - before) / (time.monotonic() - started)


def _done(url: str) -> float:
    samples = scrape(f"{url}/metrics")
    return total(samples, "kp_results_total") + total(samples, "kp_dead_letters_total")


def replay(bootstrap: str, source: str, n: int, workers: int, separate: bool) -> tuple[float, str]:
    """Wall seconds of a replay of the whole topic, and each replica's share and verdict."""
    tag = f"bench.workers.replay.{workers}{'s' if separate else ''}.{time.time_ns()}"
    env = _env(bootstrap, tag, source)
    out = f"{tag}.replay"
    base = [sys.executable, "-m", "pipeline.cli", "replay", str(TOPOLOGY), "--bootstrap",
            bootstrap, "--from-offset", "0", "--output", out, "--no-progress"]  # fmt: skip
    started = time.monotonic()
    if separate:
        base += ["--shared", "--to-offset", str(n)]  # beyond every partition's end: all of it
        procs = [
            subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        texts = [p.communicate(timeout=1800)[0].decode() for p in procs]
        codes = [p.returncode for p in procs]
    else:
        command = [*base, *(["--workers", str(workers)] if workers > 1 else [])]
        done = subprocess.run(command, env=env, capture_output=True, check=False)
        texts, codes = [done.stdout.decode()], [done.returncode]
    seconds = time.monotonic() - started
    shares = " + ".join(
        f"{count} in {took} s"
        for text in texts
        for count, took in re.findall(r"replayed ([\d,]+) requests.* in ([\d.]+) s", text)
    )
    if any(codes):
        return seconds, f"FAILED (exit codes {codes})"
    return seconds, f"{shares} | {_verdict(bootstrap, out, n)}"


def _verdict(bootstrap: str, topic: str, n: int) -> str:
    codec = AvroCodec()
    seen: Counter[str] = Counter()
    for msg in read_topic(KafkaSettings(), bootstrap, topic, timeout=600, idle=3):
        seen[codec.decode_result(msg.value()).id] += 1
    total_seen = sum(seen.values())
    if len(seen) == n and total_seen == n:
        return "every request exactly once"
    return f"{len(seen):,} distinct of {n:,}, {total_seen - len(seen):,} duplicates"


def _serving(bootstrap: str, admin: AdminClient, n: int, counts: list[int]) -> None:
    """Produce a backlog of ``n`` and print each worker count's rate on it."""
    source = "bench.workers.requests"
    ensure_topics(admin, [source], PARTITIONS, 1)
    produce_tiny(bootstrap, source, n, "s")
    print(f"serving: tiny model, backlog of {n:,} requests, {PARTITIONS} partitions")
    print("| workers | requests/s | vs 1 |")
    print("|---|---|---|")
    rates: dict[int, float] = {}
    for w in counts:
        rates[w] = serve(bootstrap, source, n, w)
        base = rates.get(counts[0], rates[w])
        print(f"| {w} | {rates[w]:,.0f} | {rates[w] / base:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the serving and replay comparisons and print a table of each."""
    p = argparse.ArgumentParser(prog="python -m load.workers", description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument(
        "--requests", type=int, default=100_000, help="serving backlog (0: no serving part)"
    )
    p.add_argument("--replay-requests", type=int, default=200_000, help="0: no replay part")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": bootstrap})
        if args.requests:
            _serving(bootstrap, admin, args.requests, counts)
        if args.replay_requests:
            n = args.replay_requests
            source = "bench.workers.replay-source"
            ensure_topics(admin, [source], PARTITIONS, 1)
            produce_tiny(bootstrap, source, n, "r")
            print(f"\nreplay: {n:,} tiny-model requests, wall time of the whole command")
            print("| how | seconds | requests/s | each replica (its own timing) | output |")
            print("|---|---|---|---|---|")
            runs = [(f"--workers {w}", w, False) for w in counts]
            runs += [(f"{w} replicas, --shared", w, True) for w in counts if w > 1]
            for name, w, separate in runs:
                seconds, verdict = replay(bootstrap, source, n, w, separate)
                print(f"| {name} | {seconds:.1f} | {n / seconds:,.0f} | {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile requests at volume: 5% of 100,000 are built to hurt, the rest must be served.

The hostile 5%, mixed at random among ordinary tiny-model requests on one topic:

- ``oversized``: a 256 KiB FP32 tensor where the model takes 64 floats;
- ``huge_shape``: a tensor claiming shape [2^31] with 256 bytes of data (an allocation
  bomb for a reader that trusts the shape);
- ``deep_json``: a v2 JSON request whose data is nested 5,000 arrays deep (past Python's
  recursion limit);
- ``image_bomb``: a 60 bytes PNG whose header claims 50,000 x 50,000 pixels (7.5 GB
  decoded), for the image model;
- ``wrong_datatype``: FP64 data declared FP64 where the model takes FP32.

Everything is produced first (a backlog), then ``kp-pipeline run`` serves it in its own
process (load/topologies/hostile.yaml: at most 20,000 requests or 64 MiB in flight), its
RSS sampled throughout. Printed: how many of each kind became dead letters and with which
reason, how many ordinary requests were served and how fast, and the peak RSS.

    python -m load.hostile [--total 100000] [--hostile 0.05]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from load.bench import topic_env
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.tools.traffic import image_request, tensor_request
from schemas.codec import AvroCodec

__all__ = ["KINDS", "HostileReport", "main", "run_hostile"]

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "load" / "topologies" / "hostile.yaml"
KINDS = ("oversized", "huge_shape", "deep_json", "image_bomb", "wrong_datatype")


@dataclass
class HostileReport:
    """What became of each kind, how the ordinary requests fared, and the memory."""

    total: int
    hostile: int
    served: int  # ordinary requests answered
    served_per_s: float
    letters_by_kind: dict[str, dict[str, int]]  # kind → reason → count
    ordinary_letters: int  # ordinary requests that became dead letters (must be 0)
    missing: int  # requests with neither a result nor a dead letter
    rss_peak_mb: float
    rss_start_mb: float
    pipeline_exit: int | None
    kinds: tuple[str, ...] = field(default=KINDS)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _deep_json(rid: str, depth: int) -> bytes:
    data = "[" * depth + "1.0" + "]" * depth
    return (
        f'{{"id": "{rid}", "model_name": "tiny-mlp", "inputs": [{{"name": "x", '
        f'"datatype": "FP32", "shape": [64], "data": {data}}}]}}'
    ).encode()


Headers = list[tuple[str, str | bytes | None]]


def _hostile(kind: str, rid: str, codec: AvroCodec) -> tuple[bytes, Headers]:
    """One hostile record: value and headers."""
    if kind == "deep_json":
        return _deep_json(rid, 5000), [("content-type", b"application/json")]
    if kind == "image_bomb":
        return codec.encode_request(
            image_request(rid, "efficientnet-lite0", _png_bomb(50_000, 50_000))
        ), []
    if kind == "oversized":
        x = np.ones(65_536, np.float32)
        return codec.encode_request(tensor_request(rid, "tiny-mlp", {"x": x})), []
    if kind == "wrong_datatype":
        return codec.encode_request(
            tensor_request(rid, "tiny-mlp", {"x": np.ones(64, np.float64)})
        ), []
    return _huge_shape(codec, rid), []


def _huge_shape(codec: AvroCodec, rid: str) -> bytes:
    """The Avro record written by hand, so that its shape can lie about its data."""
    import fastavro

    record: dict[str, Any] = {
        "id": rid, "model": "tiny-mlp", "model_version": None, "parameters": {},
        "deadline_ms": None, "reply_topic": None,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2**31], "data": b"\x00" * 256}],
    }  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.request_schema, record)
    return buf.getvalue()


def _produce(
    bootstrap: str, topic: str, total: int, share: float, seed: int, kinds: tuple[str, ...]
) -> dict[str, str]:
    """Every request, hostile ones mixed in at random; the kind of each hostile id."""
    codec = AvroCodec()
    rng = random.Random(seed)
    hostile = set(rng.sample(range(total), int(total * share)))
    of: dict[str, str] = {}
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "message.max.bytes": 8 << 20, "log_level": 3})  # fmt: skip
    x = np.ones(64, np.float32)
    for i in range(total):
        if i in hostile:
            kind = kinds[len(of) % len(kinds)]
            rid = f"h{i}"
            of[rid] = kind
            value, headers = _hostile(kind, rid, codec)
        else:
            rid, headers = f"o{i}", []
            value = codec.encode_request(tensor_request(rid, "tiny-mlp", {"x": x}))
        while True:
            try:
                producer.produce(topic, value, rid.encode(), headers=headers or None)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("requests were not all delivered to the broker")
    return of


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _drain(bootstrap: str, topics: list[str], want: int, timeout: float) -> dict[str, Any]:
    """Read results and dead letters until ``want`` records (or the timeout): by id."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "hostile-reader",
                         "fetch.wait.max.ms": 10, "log_level": 3})  # fmt: skip
    codec = AvroCodec()
    parts = [
        TopicPartition(t, p, OFFSET_BEGINNING)
        for t in topics
        for p in consumer.list_topics(t, timeout=15).topics[t].partitions
    ]
    consumer.assign(parts)
    seen: dict[str, Any] = {}
    first = last = None
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < want and time.monotonic() < deadline:
            for m in consumer.consume(2000, 0.2):
                value = m.value()
                if m.error() is not None or value is None:
                    continue
                now = time.monotonic()
                first = first or now
                last = now
                # Outcomes carry their request's key (its id here), also when the request
                # was too broken to say its own id (deep JSON).
                rid = (m.key() or b"").decode()
                if m.topic() == topics[0]:
                    seen[rid] = "result" if codec.decode_result(value).id == rid else "wrong id"
                else:
                    seen[rid] = codec.decode_dead_letter(value).reason
    finally:
        consumer.close()
    seen["__window__"] = (first, last)
    return seen


def run_hostile(
    total: int = 100_000,
    share: float = 0.05,
    seed: int = 7,
    log: Path | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> HostileReport:
    """The whole run on a broker of its own; the figures. ``kinds``: the hostile mix."""
    with EmbeddedBroker() as broker:
        env = topic_env(f"hostile.{os.getpid()}.{time.monotonic_ns()}", broker.bootstrap_servers)
        from confluent_kafka.admin import AdminClient

        from pipeline.kafka.clients import ensure_topics

        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        ensure_topics(admin, [env["KP_INPUT"], env["KP_OUTPUT"], env["KP_DLQ"]], 4, 1)
        of = _produce(broker.bootstrap_servers, env["KP_INPUT"], total, share, seed, kinds)
        out = (log or Path(os.devnull)).open("ab")
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(TOPOLOGY), "--bootstrap",
             broker.bootstrap_servers, "--metrics-port", str(free_port())],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        rss: list[float] = []
        halt = threading.Event()

        def sample() -> None:
            while not halt.is_set():
                value = _rss_mb(run.pid)
                if value is not None:
                    rss.append(value)
                halt.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seen = _drain(broker.bootstrap_servers, [env["KP_OUTPUT"], env["KP_DLQ"]], total, 300)
        finally:
            halt.set()
            sampler.join(5)
            exit_code = run.poll()
            if exit_code is None:
                run.send_signal(signal.SIGTERM)
                run.wait(60)
            out.close()
    first, last = seen.pop("__window__")
    by_kind: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in kinds}
    served = ordinary_letters = 0
    for rid, what in seen.items():
        if rid in of:
            by_kind[of[rid]][what] += 1
        elif what == "result":
            served += 1
        else:
            ordinary_letters += 1
    window = (last - first) if first and last and last > first else float("nan")
    return HostileReport(
        total, len(of), served, round(served / window, 1),
        {k: dict(v) for k, v in by_kind.items()}, ordinary_letters, total - len(seen),
        round(max(rss, default=0.0), 1), round(rss[0] if rss else 0.0, 1), exit_code, kinds,
    )  # fmt: skip


def _table(r: HostileReport) -> str:
    lines = ["| hostile kind | requests | became |", "|---|---:|---|"]
    for kind in r.kinds:
        got = r.letters_by_kind[kind]
        lines.append(
            f"| {kind} | {sum(got.values())} | "
            + ", ".join(f"{n} {reason}" for reason, n in sorted(got.items()))
            + " |"
        )
    lines.append(
        f"\n{r.total - r.hostile} ordinary requests: {r.served} served ({r.served_per_s:,.0f}/s), "
        f"{r.ordinary_letters} dead letters; {r.missing} requests missing. Pipeline RSS peak "
        f"{r.rss_peak_mb:.0f} MB (at its first sample {r.rss_start_mb:.0f} MB)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load.hostile", description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=100_000)
    ap.add_argument("--hostile", type=float, default=0.05)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated hostile kinds")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--log", type=Path, help="the pipeline's output")
    args = ap.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    report = run_hostile(args.total, args.hostile, log=args.log, kinds=kinds)
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.missing == 0 and report.ordinary_letters == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

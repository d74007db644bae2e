"""Tabular throughput: kp-pipeline serving XGBoost beside the library alone and Kafka alone.

    python -m load.tabular [--requests 200000] [--batch 256]

One embedded broker, one run. The breast-cancer XGBoost classifier (`kp-pipeline models
export --only breast-cancer`) serves ``--requests`` rows of the data set (cycled) from
one input topic, in two request forms: ``row`` (one FP32[30] ``features`` tensor) and
``named`` (30 FP32[1] tensors by feature name, the tabular demo's form), each with its
own topic and group; every variant is timed from its first consumed record to its last
acknowledged output (`load.variants`). Beside them, on the same rows: XGBoost's own
``XGBClassifier.predict_proba`` on preloaded rows in batches of ``--batch`` (what the
pipeline's batches ask of it), and the Kafka pass-through of the row form's records (no
decoding, no model: what this broker and client do with these payloads).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from confluent_kafka.admin import AdminClient

from load import variants
from pipeline.app import OpenTopology
from pipeline.config.loader import load_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics, producer_config
from pipeline.tools.traffic import produce_requests
from pipeline.tools.zoo.tabular import breast_cancer
from schemas.codec import AvroCodec
from schemas.messages import Request

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "models" / "breast_cancer_xgb.ubj"
PARTITIONS = 4
TIMEOUT_S = 900.0

TOPOLOGY = """
kafka: {{bootstrap_servers: {bootstrap}, group_id: {tag}.kp,
        consumer: {{session.timeout.ms: 6000}}}}  # Tansu holds a join for half of it
topics: {{input: [{tag}.requests], output: {tag}.results, dead_letter: {tag}.dlq,
         partitions: {partitions}}}
flow: {{max_in_flight: 8192}}
metrics: {{enabled: false}}
models:
  - name: breast-cancer
    artifact: {artifact}
    options: {{features: {form}, threads: 1}}
    batching: {{max_batch_size: {batch}, max_delay_ms: 5}}
"""


def _requests(form: str, n: int) -> list[Request]:
    x, _, names = breast_cancer()
    out = []
    for i in range(n):
        row = x[i % len(x)]
        if form == "row":
            tensors = {"features": row}
        else:
            tensors = {name: row[j : j + 1] for j, name in enumerate(names)}
        out.append(Request(f"t{i:07d}", "breast-cancer", tensors))
    return out


def _open(folder: Path, bootstrap: str, form: str, batch: int) -> OpenTopology:
    tag = f"bench.tabular.{form}.{time.time_ns()}"
    path = folder / f"tabular-{form}.yaml"
    path.write_text(
        TOPOLOGY.format(
            bootstrap=bootstrap,
            tag=tag,
            partitions=PARTITIONS,
            artifact=ARTIFACT,
            form=form,
            batch=batch,
        )
    )
    return OpenTopology(load_topology(path, env={}), str(path), folder)


def library_alone(n: int, batch: int) -> variants.Timing:
    """XGBClassifier.predict_proba on preloaded float32 rows, ``batch`` at a time."""
    import xgboost

    x, _, _ = breast_cancer()
    rows = x[np.arange(n) % len(x)]
    clf = xgboost.XGBClassifier(n_jobs=1)
    clf.load_model(str(ARTIFACT))
    clf.predict_proba(rows[:batch])  # warm-up
    start = time.monotonic()
    for i in range(0, n, batch):
        clf.predict_proba(rows[i : i + batch])
    return variants.Timing(n, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    """Produce both forms' requests, time every variant, print one table."""
    p = argparse.ArgumentParser(prog="python -m load.tabular", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    if not ARTIFACT.exists():
        print(f"{ARTIFACT} missing: kp-pipeline models export --only breast-cancer")
        return 2
    n, rows = args.requests, []
    codec = AvroCodec()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        address = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": address})
        for form in ("row", "named"):
            opened = _open(Path(tmp), address, form, args.batch)
            topic = opened.topology.topics.input[0]
            ensure_topics(admin, [topic], PARTITIONS, 1)
            reqs = _requests(form, n)
            size = len(codec.encode_request(reqs[0]))
            produce_requests(
                opened.topology.kafka,
                address,
                topic,
                ((r.id.encode(), codec.encode_request(r)) for r in reqs),
            )
            del reqs
            timing = variants.kp_pipeline(opened, address, n, TIMEOUT_S)
            rows.append((f"kp-pipeline, {form} form ({size} B a request)", timing))
            print(f"   {rows[-1][0]}: {n / timing[1]:,.0f} requests/s", flush=True)
            if form == "row":
                src = variants.Source(
                    address,
                    topic,
                    producer_config(opened.topology.kafka, address),
                    TIMEOUT_S,
                    opened.topology.flow.poll_timeout_ms / 1000.0,
                )
                rows.append(("Kafka pass-through of the row form", variants.passthrough(src, n)))
    rows.append((f"XGBoost alone, predict_proba, batch {args.batch}", library_alone(n, args.batch)))
    base = n / rows[0][1][1]
    print(f"\nbreast-cancer XGBoost (60 trees, depth 4), {n:,} requests, batch ≤ {args.batch}:\n")
    print("| variant | requests/s | kp-pipeline (row) ÷ this |")
    print("|---|---:|---:|")
    for name, timing in rows:
        rate = timing[0] / timing[1]
        print(f"| {name} | {rate:,.0f} | {base / rate:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

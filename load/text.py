"""Text preprocessing figures: tokens/s of the tokenize stage, and padding waste.

Padding waste is padded tokens over real tokens, read from the pipeline's own
``kp_padding_elements_total`` after serving the same mixed-length requests twice on one
broker: with length buckets (``padding: bucket``, the text demo's setting) and with every
batch padded to its longest text (``padding: longest``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from load.backlog import scrape
from pipeline.app import open_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.samples import mixed_texts
from pipeline.tools.traffic import produce_requests, text_request
from schemas.codec import AvroCodec
from stages.base import Batch, StageContext
from stages.preprocess.text import Tokenize, TokenizeParams

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOPOLOGY = ROOT / "topology-text.yaml"

__all__ = ["PaddingRow", "image_demo_share", "padding_rows", "text_markdown", "tokens_per_second"]


@dataclass
class PaddingRow:
    """One padding mode served end to end."""

    mode: str
    requests: int
    seconds: float
    real_tokens: int
    padded_tokens: int

    @property
    def waste(self) -> float:
        """Padded tokens per real token."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else 0.0


def tokens_per_second(batch_size: int = 16, n: int = 2000) -> float:
    """The tokenize stage alone on mixed texts: real tokens per second."""
    stage = Tokenize(
        TokenizeParams(tokenizer=ROOT / "models" / "minilm_tokenizer.json", buckets=[512])
    )
    stage.setup(StageContext(model="bench"))
    texts = mixed_texts(n)

    batches = []
    for i in range(0, n, batch_size):
        col = np.empty((len(texts[i : i + batch_size]), 1), dtype=object)
        for j, t in enumerate(texts[i : i + batch_size]):
            col[j, 0] = t.encode()
        batches.append(col)
    t0 = time.perf_counter()
    real = 0
    for col in batches:
        out = stage.process(Batch(list(range(len(col))), {"text": col}))
        real += int(np.asarray(out.columns["attention_mask"]).sum())
    return real / (time.perf_counter() - t0)


def padding_rows(n: int = 800) -> list[PaddingRow]:
    """Serve ``n`` mixed-length texts with buckets, then padded to each batch's longest."""
    rows = []
    codec = AvroCodec()
    texts = mixed_texts(n)
    with EmbeddedBroker() as broker:
        for mode in ("bucket", "longest"):
            rows.append(_serve(broker.bootstrap_servers, mode, texts, codec))
    return rows


def _serve(bootstrap: str, mode: str, texts: list[str], codec: AvroCodec) -> PaddingRow:
    doc = yaml.safe_load(TEXT_TOPOLOGY.read_text())
    tag = f"pad-{mode}-{os.getpid()}"
    doc["kafka"]["group_id"] = tag
    doc["topics"] = {"input": [f"{tag}-in"], "output": f"{tag}-out", "dead_letter": f"{tag}-dlq"}
    model = doc["models"][0]
    model["artifact"] = str(ROOT / model["artifact"])
    model["preprocess"][0]["tokenizer"] = str(ROOT / model["preprocess"][0]["tokenizer"])
    model["preprocess"][0]["padding"] = mode
    path = Path(f"/tmp/{tag}.yaml")
    path.write_text(yaml.safe_dump(doc))
    opened = open_topology(path)
    served = BackgroundPipeline(opened, bootstrap).start()
    try:
        assert served.pipeline is not None
        stats, url = served.pipeline.stats, served.pipeline.metrics_url
        assert url is not None
        produce_requests(
            opened.topology.kafka,
            bootstrap,
            f"{tag}-in",
            (
                (f"t{i}".encode(), codec.encode_request(text_request(f"t{i}", model["name"], t)))
                for i, t in enumerate(texts)
            ),
        )
        deadline = time.monotonic() + 300
        # Texts over the largest bucket come back as dead letters: count both.
        while stats.results + stats.dead_letters < len(texts) and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = (stats.last_delivered or 0.0) - (stats.first_consumed or 0.0)
        time.sleep(0.1)
        s = scrape(url)
    finally:
        served.stop()
        path.unlink(missing_ok=True)
    # Three token tensors (ids, mask, types) are counted: a third of each is the tokens.
    padded = s["kp_padding_elements_total{kind=padded,model=minilm-l6}"] // 3
    real = s["kp_padding_elements_total{kind=real,model=minilm-l6}"] // 3
    return PaddingRow(mode, stats.results, seconds, int(real), int(padded))


def image_demo_share(n: int = 300) -> tuple[float, float]:
    """The image demo served end to end: preprocessing's share of its time.

    Returns (preprocess ÷ preprocess+compute+postprocess, summed over batches from the
    pipeline's histograms; mean over requests of preprocess_ms ÷ end_to_end_ms, from the
    results, where end to end also counts waiting in Kafka and in the batcher).
    """
    from pipeline.tools.samples import sample_jpegs
    from pipeline.tools.traffic import image_request, read_topic

    doc = yaml.safe_load((ROOT / "topology.yaml").read_text())
    tag = f"share-{os.getpid()}"
    doc["kafka"]["group_id"] = tag
    doc["topics"] = {"input": [f"{tag}-in"], "output": f"{tag}-out", "dead_letter": f"{tag}-dlq"}
    model = doc["models"][0]
    model["artifact"] = str(ROOT / model["artifact"])
    model["postprocess"][-1]["labels"] = str(ROOT / model["postprocess"][-1]["labels"])
    path = Path(f"/tmp/{tag}.yaml")
    path.write_text(yaml.safe_dump(doc))
    codec = AvroCodec()
    photos = list(sample_jpegs().values())
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        opened = open_topology(path)
        kafka = opened.topology.kafka
        served = BackgroundPipeline(opened, bootstrap).start()
        try:
            assert served.pipeline is not None
            url = served.pipeline.metrics_url
            assert url is not None
            produce_requests(
                kafka,
                bootstrap,
                f"{tag}-in",
                (
                    (None, codec.encode_request(image_request(f"i{i}", model["name"], photo)))
                    for i, photo in enumerate(photos[i % len(photos)] for i in range(n))
                ),
            )
            results = [
                codec.decode_result(m.value())
                for m in read_topic(kafka, bootstrap, f"{tag}-out", count=n, timeout=300)
            ]
            s = scrape(url)
        finally:
            served.stop()
            path.unlink(missing_ok=True)
    name = model["name"]

    def summed(metric: str) -> float:
        return sum(
            v for k, v in s.items() if k.startswith(f"{metric}_sum{{") and f"model={name}" in k
        )

    pre, compute, post = (
        summed(m) for m in ("kp_preprocess_seconds", "kp_compute_seconds", "kp_postprocess_seconds")
    )
    per_request = float(
        np.mean([r.timings.preprocess_ms / r.timings.end_to_end_ms for r in results])
    )
    return pre / (pre + compute + post), per_request


def text_markdown(tokens_s: float, padding: list[PaddingRow], share: tuple[float, float]) -> str:
    """The text and end-to-end sections of the preprocessing report."""
    lines = [
        "### Text: tokenization and padding waste (MiniLM-L6 text demo, end to end)",
        "",
        f"`tokenize` stage alone (MiniLM's WordPiece tokenizer, batches of 16 mixed texts): "
        f"{tokens_s:,.0f} tokens/s.",
        "",
        "| padding | results | seconds | requests/s | real tokens | padded tokens "
        "| waste (padded ÷ real) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in padding:
        rate = r.requests / r.seconds if r.seconds else 0.0
        lines.append(
            f"| {r.mode} | {r.requests} | {r.seconds:.2f} | {rate:,.1f} | {r.real_tokens:,} | "
            f"{r.padded_tokens:,} | {r.waste:.2f} |"
        )
    by = {r.mode: r for r in padding}
    if {"bucket", "longest"} <= by.keys():
        b, lo = by["bucket"], by["longest"]
        lines += [
            "",
            f"Buckets [16, 32, 64, 128] against every batch padded to its longest text: "
            f"{lo.waste / b.waste if b.waste else 0:.1f}x less padding, "
            f"{(b.requests / b.seconds) / (lo.requests / lo.seconds):.2f}x the throughput.",
        ]
    batch_share, request_share = share
    lines += [
        "",
        "### Image demo: preprocessing's share (topology.yaml, end to end)",
        "",
        f"- of the batch work (preprocess ÷ preprocess + model + postprocess, summed over "
        f"batches): {batch_share:.0%}",
        f"- of each request's end-to-end time (mean of preprocess_ms ÷ end_to_end_ms; end to "
        f"end includes waiting in Kafka and the batcher): {request_share:.0%}",
        "",
    ]
    return "\n".join(lines)

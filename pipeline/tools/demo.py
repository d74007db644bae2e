"""``kp-pipeline demo``: the whole product in one command, on an embedded broker.

Starts Tansu, serves the topology, sends the sample photos (and one corrupt image) as
requests through a `pipeline.client.Client`, as a service would (texts for a text model,
the breast-cancer rows for a tabular one: `pipeline.tools.demo_tabular`), prints one line per
result and the dead letter the client was told of, then a throughput line, and shuts
everything down cleanly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from pipeline.app import OpenTopology, make_codec, serve
from pipeline.client import Client, InferenceError
from pipeline.engine.loop import Replica, RunStats
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.demo_tabular import is_tabular, report_rows, row_requests
from pipeline.tools.samples import SAMPLE_TEXTS, sample_jpegs
from pipeline.tools.traffic import image_request, text_request
from schemas.errors import KpError
from schemas.messages import DeadLetter, Request, Result

__all__ = ["BackgroundPipeline", "run_demo"]

Echo = Callable[[str], None]


class BackgroundPipeline:
    """A pipeline served on a thread, for the demo, tests and benchmarks."""

    def __init__(self, opened: OpenTopology, bootstrap: str, metrics_port: int = 0) -> None:
        self._opened = opened
        self._bootstrap = bootstrap
        self._metrics_port = metrics_port  # 0: any free port, so several can run at once
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pipeline")
        self.pipeline: Replica | None = None
        self.stats: RunStats | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> BackgroundPipeline:
        """Start serving and wait until partitions are assigned."""
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            self._thread.join()
            raise self.error
        assert self.pipeline is not None
        if not self.pipeline.assigned.wait(timeout):
            self.stop()
            raise KpError(f"no partitions assigned within {timeout}s")
        return self

    def stop(self) -> RunStats:
        """Drain, commit and stop; re-raises what the pipeline raised."""
        self._stop.set()
        self._thread.join()
        self.pipeline = None  # the last reference: its Kafka clients close here
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats

    def _serve(self) -> None:
        def on_ready(_: str, pipeline: Replica) -> None:
            self.pipeline = pipeline
            self._ready.set()

        try:
            self.stats = serve(
                self._opened,
                self._stop,
                self._bootstrap,
                on_ready=on_ready,
                metrics_port=self._metrics_port,
            )
        except BaseException as e:
            self.error = e
            self._ready.set()


class _Send:
    """Sends the demo's requests as a service would: through a `Client`.

    The client's reply topic brings each result back; its dead-letter reader names each
    request the pipeline refused.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.futures: list[Future[Result]] = []

    def __call__(self, requests: list[Request]) -> None:
        self.futures += [self.client.send(r) for r in requests]
        self.client.flush()

    def answers(self, timeout: float) -> tuple[list[Result], list[DeadLetter]]:
        """Every request's result, and the dead letters of those refused."""
        deadline = time.monotonic() + timeout
        results, letters = [], []
        for future in self.futures:
            try:
                results.append(future.result(max(deadline - time.monotonic(), 0.01)))
            except InferenceError as e:
                if e.dead_letter is None:
                    raise
                letters.append(e.dead_letter)
            except TimeoutError:
                self.client.forget(future)
        return results, letters


def run_demo(opened: OpenTopology, requests: int, show: int, echo: Echo) -> int:
    """Run the demo (photos; texts when the model tokenizes; rows for a tabular model)."""
    topology = opened.topology
    model = topology.models[0]
    text = any(stage.stage == "tokenize" for stage in model.preprocess)
    tabular = is_tabular(model)
    codec = make_codec(topology)
    with EmbeddedBroker() as broker:
        address = broker.bootstrap_servers
        echo(f"embedded Tansu broker on {address}")
        served = BackgroundPipeline(opened, address).start()
        devices = ", ".join(dict.fromkeys(model.instance_devices()))
        topics = topology.topics
        with Client(
            address,
            topics.input[0],
            topics.dead_letter,
            settings=topology.kafka,
            codec=codec,
            client_id="demo",
        ) as client:
            backend = model.backend or "backend from the artifact"
            echo(
                f"serving {model.name} ({backend} on {devices}) from "
                f"{', '.join(topics.input)}; a kp_pipeline.Client sends the requests and "
                f"reads each answer on its reply topic {client.reply_topic}"
            )
            t0 = time.monotonic()
            send = _Send(client)
            expected = requests
            if tabular:
                rows, expected = row_requests(topology, requests)
                send(rows)
                echo(f"produced {expected} row requests ({requests} rows × each version) "
                     "and 1 with a misspelt feature")  # fmt: skip
            else:
                (_produce_texts if text else _produce_samples)(send, model.name, requests, echo)
            results, letters = send.answers(timeout=300)
            elapsed = time.monotonic() - t0
        stats = served.stop()
    dlq = topology.topics.dead_letter
    if tabular:
        report_rows(topology, results, letters, dlq, echo)
    else:
        (_report_texts if text else _report)(results, letters, show, dlq, echo)
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    echo(
        f"{len(results)} results, {len(letters)} dead letter in {elapsed:.2f} s: "
        f"{rate:.1f} requests/s (first request sent → last answer received; "
        f"the pipeline consumed {stats.consumed} and committed every offset it consumed: "
        f"{sum(stats.committed.values()) == stats.consumed})"
    )
    if len(results) != expected or len(letters) != 1:
        raise KpError(f"expected {expected} results and 1 dead letter")
    return 0


def _produce_texts(send: _Send, model: str, requests: int, echo: Echo) -> None:
    names = list(SAMPLE_TEXTS)
    good = [
        text_request(f"demo-{i:05d}-{name}", model, SAMPLE_TEXTS[name])
        for i, name in ((i, names[i % len(names)]) for i in range(requests))
    ]
    send([*good, text_request("demo-too-long", model, "kafka " * 400)])
    echo(f"produced {requests} texts of mixed lengths ({len(names)} samples) and 1 too long")


def _report_texts(
    results: list[Result], letters: list[DeadLetter], show: int, dlq: str, echo: Echo
) -> None:
    """Each sample's nearest other sample by cosine similarity: its paraphrase, if it works."""
    by_sample: dict[str, np.ndarray[Any, Any]] = {}
    for r in results:
        by_sample.setdefault(r.id.split("-", 2)[2], r.outputs["embedding"].astype(np.float64))
    echo("")
    echo(f"{'id':<22} {'text':<44} {'dims':>4} {'norm':>5} {'batch':>5} {'nearest (cosine)':<20}")
    for r in sorted(results, key=lambda r: r.id)[:show]:
        name = r.id.split("-", 2)[2]
        emb = r.outputs["embedding"].astype(np.float64)
        others = {k: float(emb @ v) for k, v in by_sample.items() if k != name}
        near = max(others, key=lambda k: others[k]) if others else "-"
        echo(
            f"{r.id:<22} {SAMPLE_TEXTS[name][:44]:<44} {emb.size:>4} "
            f"{np.linalg.norm(emb):>5.3f} {r.batch_size:>5} {near} ({others.get(near, 0):.2f})"
        )
    _report_tail(results, letters, show, dlq, echo)


def _produce_samples(send: _Send, model: str, requests: int, echo: Echo) -> None:
    photos = sample_jpegs()
    names = list(photos)
    good = [
        image_request(f"demo-{i:05d}-{photo}", model, photos[photo])
        for i, photo in ((i, names[i % len(names)]) for i in range(requests))
    ]
    corrupt = image_request("demo-corrupt", model, photos[names[0]][:600])
    send([*good, corrupt])
    echo(f"produced {requests} photo requests ({', '.join(names)}) and 1 corrupt image")


def _report(
    results: list[Result], letters: list[DeadLetter], show: int, dlq: str, echo: Echo
) -> None:
    echo("")
    echo(f"{'id':<20} {'top-5 classes':<84} {'batch':>5} {'compute':>9} {'e2e':>9}")
    for r in sorted(results, key=lambda r: r.id)[:show]:
        labels = [b.decode() for b in r.outputs["labels"].tolist()]
        scores = r.outputs["scores"].tolist()
        top = " | ".join(f"{lab} {s:.0%}" for lab, s in zip(labels, scores, strict=True))
        echo(
            f"{r.id:<20} {top[:84]:<84} {r.batch_size:>5} "
            f"{r.timings.compute_ms:>7.1f}ms {r.timings.end_to_end_ms:>7.0f}ms"
        )
    _report_tail(results, letters, show, dlq, echo)


def _report_tail(
    results: list[Result], letters: list[DeadLetter], show: int, dlq: str, echo: Echo
) -> None:
    if len(results) > show:
        echo(f"... {len(results) - show} more results")
    for d in letters:
        echo(f"dead letter: {d.id} → {dlq}: {d.reason}: {d.error[:90]}")
    echo("")

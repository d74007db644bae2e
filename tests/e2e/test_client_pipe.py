"""The service client against a real pipeline on the real broker.

`Client.infer` returns results and raises the dead letter's reason; `AsyncClient` does the
same under asyncio; the reply topic is the client's own and goes when it closes. Under a
20,000-request load the pipeline is SIGKILLed in the middle and started again: every
future resolves (a result, or a timeout) and none waits past its timeout.
"""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import Future, wait
from pathlib import Path

import numpy as np
from confluent_kafka.admin import AdminClient
from e2e.kit import Topics, spawn_run, start_background

from pipeline.client import AsyncClient, Client, InferenceError
from pipeline.kafka.broker import EmbeddedBroker
from schemas.messages import Request, Result, Status

X = np.linspace(-1, 1, 64, dtype=np.float32)


def _client(broker: EmbeddedBroker, topics: Topics, **kwargs: object) -> Client:
    return Client(broker.bootstrap_servers, topics.input, topics.dead_letter, **kwargs)  # type: ignore[arg-type]


def _topics(broker: EmbeddedBroker) -> set[str]:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    return set(admin.list_topics(timeout=10).topics)


def test_infer_returns_results_and_raises_dead_letters_reasons(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    served = start_background(tiny_topology, broker)
    outcomes: dict[str, object] = {}
    try:
        with _client(broker, topics, client_id="svc") as client:
            reply = client.reply_topic
            assert reply.startswith("kp.replies.svc.")
            assert reply in _topics(broker)
            result = client.infer("tiny-mlp", {"x": X}, timeout=30)
            outcomes["ok"] = result
            for name, inputs in (
                ("unknown", ("nope", {"x": X})),
                ("text", ("tiny-mlp", {"x": "a cat"})),
            ):
                try:
                    client.infer(*inputs, timeout=30)  # type: ignore[arg-type]
                except InferenceError as e:
                    outcomes[name] = e
            many = [client.submit("tiny-mlp", {"x": X * i}) for i in range(200)]
            done, not_done = wait(many, timeout=60)
            outcomes["many"] = (len(done), len(not_done), {f.result().status for f in done})
            outcomes["in_flight"] = client.in_flight

            async def use_async() -> list[Result]:
                async with AsyncClient(
                    broker.bootstrap_servers, topics.input, topics.dead_letter
                ) as aclient:
                    outcomes["async_reply"] = aclient.reply_topic
                    return list(
                        await asyncio.gather(
                            *(aclient.infer("tiny-mlp", {"x": X}, timeout=30) for _ in range(50))
                        )
                    )

            outcomes["async"] = asyncio.run(use_async())
    finally:
        served.stop()
    ok = outcomes["ok"]
    assert isinstance(ok, Result)
    assert ok.status == Status.OK
    assert {"classes", "scores"} <= set(ok.outputs), ok.outputs  # top-3 of the softmax
    assert ok.outputs["scores"].shape == (3,)
    unknown, text = outcomes["unknown"], outcomes["text"]
    assert isinstance(unknown, InferenceError)
    assert unknown.reason == "unknown_model"
    assert unknown.dead_letter is not None
    assert unknown.dead_letter.model == "nope"
    assert isinstance(text, InferenceError)
    assert text.reason == "bad_tensor"
    assert outcomes["many"] == (200, 0, {Status.OK})
    assert outcomes["in_flight"] == 0
    assert len(outcomes["async"]) == 50  # type: ignore[arg-type]
    remaining = _topics(broker)
    assert reply not in remaining  # deleted on close
    assert outcomes["async_reply"] not in remaining


def test_results_in_json_and_protobuf_come_back_as_results_and_send_keeps_the_request(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    """The client reads whatever encoding the topology answers in; `send` keeps the id."""
    answers: dict[str, Result] = {}
    for encoding in ("json", "protobuf"):
        tiny_topology.write_text(
            tiny_topology.read_text()
            .replace("create: false", f"create: false, result_encoding: {encoding}")
            .replace("result_encoding: json, ", "")
        )
        served = start_background(tiny_topology, broker)
        try:
            with _client(broker, topics) as client:
                request = Request(f"mine-{encoding}", "tiny-mlp", {"x": X}, parameters={"a": "b"})
                answers[encoding] = client.send(request).result(30)
        finally:
            served.stop()
    for encoding, result in answers.items():
        assert result.id == f"mine-{encoding}"
        assert result.status == Status.OK
        assert result.outputs["scores"].shape == (3,)
    np.testing.assert_array_equal(
        answers["json"].outputs["scores"], answers["protobuf"].outputs["scores"]
    )


def test_no_infer_hangs_past_its_timeout_when_the_pipeline_is_killed_mid_load(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    n, timeout = 20_000, 25.0
    log = tmp_path / "run.log"
    run = spawn_run(tiny_topology, broker, log)
    with _client(broker, topics) as client:
        client.infer("tiny-mlp", {"x": X}, timeout=60)  # the pipeline is up
        futures: list[tuple[float, Future[Result]]] = []
        for i in range(n):
            futures.append((time.monotonic(), client.submit("tiny-mlp", {"x": X})))
            if i == n // 2:  # SIGKILL in the middle, then start it again
                client.flush()
                run.send_signal(signal.SIGKILL)
                run.wait(30)
                run = spawn_run(tiny_topology, broker, log)
        client.flush()
        late: list[float] = []
        results = timeouts = errors = 0
        for sent, future in futures:
            try:
                future.result(max(sent + timeout - time.monotonic(), 0.0) + 2.0)
                results += 1
            except TimeoutError:
                client.forget(future)
                timeouts += 1
                late.append(time.monotonic() - sent)
            except InferenceError:
                errors += 1
    # The async client: the pipeline is killed while 300 requests wait, and not restarted.
    hung, answered, timed_out = asyncio.run(_async_through_a_kill(broker, topics, run))
    print(
        f"sync: {results} results, {timeouts} timeouts, {errors} errors of {n}; "
        f"async: {answered} answered, {timed_out} timed out, {hung} hung"
    )
    assert results + timeouts + errors == n
    assert errors == 0
    assert results > n * 0.9  # at-least-once: the restarted pipeline serves what was pending
    assert all(t <= timeout + 3.0 for t in late), max(late)
    assert hung == 0
    assert answered + timed_out == 300
    assert timed_out > 0


async def _async_through_a_kill(
    broker: EmbeddedBroker, topics: Topics, run: object
) -> tuple[int, int, int]:
    """(hung, answered, timed out) of 300 async requests across a SIGKILL at the 30th."""
    timeout = 5.0
    async with AsyncClient(broker.bootstrap_servers, topics.input, topics.dead_letter) as client:
        await client.infer("tiny-mlp", {"x": X}, timeout=30)
        start = time.monotonic()
        tasks = []
        for i in range(300):
            tasks.append(asyncio.ensure_future(client.infer("tiny-mlp", {"x": X}, timeout=timeout)))
            if i == 30:
                await asyncio.sleep(0.05)
                run.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        done, pending = await asyncio.wait(tasks, timeout=timeout + 3.0)
        elapsed = time.monotonic() - start
        answered = sum(1 for t in done if t.exception() is None)
        timed_out = sum(1 for t in done if isinstance(t.exception(), TimeoutError))
        for t in pending:
            t.cancel()
        assert elapsed <= timeout + 3.5
        return len(pending), answered, timed_out


def test_produce_wait_prints_each_answer_through_the_client(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from e2e.kit import ROOT

    tensor = tmp_path / "x.npy"
    np.save(tensor, X)

    def produce(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "produce", str(tiny_topology),
             "--bootstrap", broker.bootstrap_servers, "--tensor", f"x={tensor}", *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip

    served = start_background(tiny_topology, broker)
    try:
        ok = produce("--count", "3", "--wait", "30")
        refused = produce("--model", "nope", "--id-prefix", "bad-", "--wait", "30")
    finally:
        served.stop()
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["req-0", "req-1", "req-2"]
    assert all(" OK classes=[" in line and "scores=[" in line for line in lines[:3]), lines
    assert lines[-1] == "3 of 3 requests answered with a result"
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[0].startswith("bad-0: unknown_model: ")
    assert refused.stdout.splitlines()[-1] == "0 of 1 requests answered with a result"

from __future__ import annotations

import io
import queue
import time
from typing import Any

import numpy as np
from PIL import Image

from backends.base import ModelInfo, ModelSpec
from pipeline.graph import ModelGraph
from pipeline.messages import Envelope, Request
from pipeline.model_runtime import ModelRuntime
from pipeline.outcomes import Outcome, OutcomeEncoder
from pipeline.tensors import TensorSpec
from schemas.codec import AvroCodec
from stages.postprocess.classification import TopK, TopKParams
from stages.preprocess.image import DecodeImage, DecodeImageParams, Normalize, NormalizeParams

CODEC = AvroCodec()


class FakeBackend:
    """Mean brightness per channel as 'logits'; fails on batches holding a black image."""

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        return ModelInfo(
            {"image": TensorSpec("FP32", (2, 2, 3))}, {"logits": TensorSpec("FP32", (3,))}
        )

    def infer(self, batch: Any) -> dict[str, np.ndarray]:
        x = batch["image"]
        if (x.reshape(len(x), -1).max(axis=1) <= 0).any():
            raise RuntimeError("CUDA out of memory (pretend)")
        return {"logits": x.mean(axis=(1, 2))}

    def unload(self) -> None:
        pass


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), rgb).save(buf, "PNG")
    return buf.getvalue()


def _env(i: int, image: bytes) -> Envelope:
    arr = np.empty(1, dtype=object)
    arr[0] = image
    return Envelope(
        "in",
        0,
        i,
        str(i).encode(),
        b"raw-%d" % i,
        int(time.time() * 1000),
        time.monotonic(),
        1,
        Request(f"r{i}", "m", {"image": arr}),
    )


def _runtime(instances: int = 1) -> tuple[ModelRuntime, queue.Queue[list[Outcome]]]:
    from pipeline.config import ModelSettings

    settings = ModelSettings(
        name="m",
        backend="fake",
        artifact="x",
        instances=instances,
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
    )
    graph = ModelGraph(
        settings,
        [DecodeImage(DecodeImageParams()), Normalize(NormalizeParams(mean=[0] * 3, std=[1] * 3))],
        [TopK(TopKParams(input="logits", k=1))],
        [FakeBackend() for _ in range(instances)],
        FakeBackend().load(ModelSpec("m", "x"), "cpu"),  # type: ignore[arg-type]
        {"image": TensorSpec("BYTES", (1,))},
        {},
    )
    out: queue.Queue[list[Outcome]] = queue.Queue()
    runtime = ModelRuntime(graph, OutcomeEncoder(CODEC, "results", "dlq"), out.put)
    runtime.start()
    return runtime, out


def _collect(out: queue.Queue[list[Outcome]], n: int) -> list[Outcome]:
    got: list[Outcome] = []
    while len(got) < n:
        got.extend(out.get(timeout=10))
    return got


def test_every_row_gets_a_result_rejects_become_dead_letters() -> None:
    runtime, out = _runtime()
    images = [_png((255, 0, 0)), b"garbage", _png((0, 0, 255)), _png((0, 255, 0))]
    runtime.submit([_env(i, img) for i, img in enumerate(images)])
    outcomes = _collect(out, 4)
    assert runtime.stop(5)
    assert runtime.busy == 0
    by_offset = {o.envelope.offset: o for o in outcomes}
    assert by_offset[1].topic == "dlq"
    assert by_offset[1].reason == "bad_image"
    assert CODEC.decode_dead_letter(by_offset[1].value).payload == b"raw-1"
    for offset, cls in ((0, 0), (2, 2), (3, 1)):
        result = CODEC.decode_result(by_offset[offset].value)
        assert by_offset[offset].topic == "results"
        assert result.outputs["classes"].tolist() == [cls]
        assert result.batch_size == 3  # the rows the model ran; the corrupt one left before
        assert (result.partition, result.offset) == (0, offset)


def test_a_failing_inference_dead_letters_its_batch_only() -> None:
    runtime, out = _runtime(instances=2)
    runtime.submit([_env(0, _png((9, 9, 9))), _env(1, _png((0, 0, 0)))])
    runtime.submit([_env(2, _png((1, 2, 3)))])
    outcomes = _collect(out, 3)
    assert runtime.stop(5)
    reasons = {o.envelope.offset: o.reason for o in outcomes}
    assert reasons == {0: "inference_failed", 1: "inference_failed", 2: None}
    letter = CODEC.decode_dead_letter(next(o.value for o in outcomes if o.envelope.offset == 1))
    assert "CUDA out of memory" in letter.error

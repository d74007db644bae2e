"""The demo topology serving real photos: the right classes come back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e2e.kit import MODELS, ROOT, Topics, committed_offsets, end_offsets, read_all, start_background

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.samples import SAMPLES, sample_jpegs
from pipeline.tools.traffic import image_request, produce_requests
from schemas.codec import AvroCodec

pytestmark = pytest.mark.image_model


PILLOW_CHAIN = """    preprocess:
      - {stage: decode_image, input: image, max_pixels: 40000000}
      - {stage: resize, size: 256, interpolation: bilinear}
      - {stage: center_crop, size: 224}
      # EfficientNet-Lite's own normalisation: (x - 127) / 128 on 0..255 pixels.
      - {stage: normalize, mean: [127.0, 127.0, 127.0], std: [128.0, 128.0, 128.0], scale: 1.0}
      - {stage: to_nchw, output: input}
"""
# The same numbers as one DALI pipeline (its CPU operators here; nvJPEG on a GPU).
DALI_CHAIN = """    preprocess:
      - {stage: dali_image, input: image, output: input, resize: 256, crop: 224,
         interpolation: bilinear, mean: [127.0, 127.0, 127.0], std: [128.0, 128.0, 128.0],
         scale: 1.0}
"""
# gpu_decode_image's torch code with Pillow as its decoder (torchvision does not load with
# the CPU torch here); on a GPU the same stage decodes with nvJPEG (decoder: nvjpeg).
GPU_DECODE_CHAIN = """    preprocess:
      - {stage: gpu_decode_image, input: image, output: input, resize: 256, crop: 224,
         interpolation: bilinear, mean: [127.0, 127.0, 127.0], std: [128.0, 128.0, 128.0],
         scale: 1.0, decoder: pillow}
"""


def _demo_topology(tmp_path: Path, topics: Topics, chain: str = "pillow") -> Path:
    """The shipped topology.yaml, pointed at this test's topics and group."""
    text = (ROOT / "topology.yaml").read_text()
    assert PILLOW_CHAIN in text, "topology.yaml's preprocess changed: update this test"
    if chain == "dali":
        text = text.replace(PILLOW_CHAIN, DALI_CHAIN)
    elif chain == "gpu_decode":
        # By import string: an editable install made before the stage existed lacks it.
        stage = "stages.preprocess.image_gpu:GpuDecodeImage"
        text = text.replace(PILLOW_CHAIN, GPU_DECODE_CHAIN.replace("gpu_decode_image", stage))
    text = text.replace("${KP_GROUP:-kp-demo}", topics.group)
    text = text.replace("input: [kp.requests]", f"input: [{topics.input}]")
    text = text.replace("output: kp.results", f"output: {topics.output}")
    text = text.replace("dead_letter: kp.dead-letters", f"dead_letter: {topics.dead_letter}")
    text = text.replace("models/", f"{MODELS}/")
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("chain", ["pillow", "dali", "gpu_decode"])
def test_known_photos_get_their_class(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, chain: str
) -> None:
    if not (MODELS / "efficientnet_lite0.onnx").exists():
        pytest.fail("models/efficientnet_lite0.onnx missing: run `make models`")
    if chain == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (the dali extra)")
    codec = AvroCodec()
    photos = sample_jpegs()
    records: list[tuple[bytes | None, bytes]] = []
    for rep in range(3):
        for s in SAMPLES:
            rid = f"{s.name}-{rep}"
            records.append(
                (
                    rid.encode(),
                    codec.encode_request(image_request(rid, "efficientnet-lite0", photos[s.name])),
                )
            )
    truncated = image_request("truncated", "efficientnet-lite0", photos["cat"][:500])
    records.append((b"truncated", codec.encode_request(truncated)))
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)

    served = start_background(_demo_topology(tmp_path, topics, chain), broker)
    results = [codec.decode_result(m.value()) for m in read_all(broker, topics.output, 9)]
    letters = [codec.decode_dead_letter(m.value()) for m in read_all(broker, topics.dead_letter, 1)]
    served.stop()

    expected = {s.name: s.expected for s in SAMPLES}
    assert len(results) == 9
    for r in results:
        top1 = int(r.outputs["classes"][0])
        assert top1 in expected[r.id.split("-")[0]], (r.id, r.outputs["labels"].tolist())
        assert r.outputs["labels"].shape == (5,)
        assert "input" not in r.outputs  # the preprocessed tensor is not published
        assert r.outputs["scores"][0] >= r.outputs["scores"][4]
        assert r.timings.compute_ms > 0
        assert r.timings.end_to_end_ms > 0
    assert [(d.id, d.reason) for d in letters] == [("truncated", "bad_image")]
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )


def test_the_demo_command_answers_every_photo_through_the_client() -> None:
    """`kp-pipeline demo` as the README runs it: its own broker, a Client, one dead letter."""
    if not (MODELS / "efficientnet_lite0.onnx").exists():
        pytest.fail("models/efficientnet_lite0.onnx missing: run `make models`")
    command = [sys.executable, "-m", "pipeline.cli", "demo", str(ROOT / "topology.yaml")]
    done = subprocess.run(
        [*command, "--requests", "12"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "a kp_pipeline.Client sends the requests" in out
    assert "demo-00000-cat       Egyptian cat" in out
    assert "dead letter: demo-corrupt → kp.dead-letters: bad_image" in out
    assert "12 results, 1 dead letter" in out
    assert "committed every offset it consumed: True" in out

"""Codec micro-benchmark: µs per request decoded and per result encoded, side by side.

    python -m load.codec [--repeats 7] [--batch 1000]

Three codecs in one run, on the same values: the pure-Python reference
(``AvroCodec(compiled=False)``, schemas.binary), the compiled one (schemas/_codec_fast.pyx,
"not built" where it is not) and fastavro. Decode is `AvroCodec.decode_requests` over a
consumed batch (checked `Request`s with NumPy arrays); fastavro's column is
``schemaless_reader`` alone, a record dict without those checks or arrays, so it flatters
fastavro. Encode is `AvroCodec.result_batch` + `ResultBatch.encode_all` for a whole batch
(the per-batch encoder set-up included), against fastavro's `AvroCodec.encode_result` per
result. Each figure is the best of ``--repeats`` passes over the batch, divided by its
size: a lower bound for one process on a quiet core. Cases:

- tiny: the tiny model's request, ``x`` FP32[64], and its result (top-3 scores and classes);
- image: the image demo's request, one ~57 KB JPEG as BYTES[1], and a top-5 result with
  label strings;
- image tensor: a UINT8[224,224,3] tensor (150 KB) instead of a JPEG.

Only the host CPU runs here; nothing is measured on a GPU.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro
import numpy as np

from schemas.codec import COMPILED, AvroCodec
from schemas.messages import Request, Result, Status, Timings

__all__ = ["Case", "main"]


@dataclass(frozen=True)
class Case:
    """One request kind and the result columns its model would give, per row."""

    name: str
    request: Request
    columns: dict[str, np.ndarray[Any, Any]]


def _bytes_column(rows: int, items: Sequence[bytes]) -> np.ndarray[Any, Any]:
    arr = np.empty((rows, len(items)), dtype=object)
    for i in range(rows):
        arr[i, :] = list(items)
    return arr


def _jpeg() -> bytes:
    try:
        from pipeline.tools.samples import sample_jpegs

        return next(iter(sample_jpegs().values()))
    except Exception:  # scikit-image missing: a JPEG-sized blob costs the same to codecs
        return b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(57_000)


def cases(rows: int) -> list[Case]:
    """The three cases, with result columns for ``rows`` rows."""
    rng = np.random.default_rng(0)
    image = np.empty(1, dtype=object)
    image[0] = _jpeg()
    return [
        Case(
            "tiny FP32[64]",
            Request("req-0000001", "tiny-mlp", {"x": rng.standard_normal(64).astype(np.float32)}),
            {
                "scores": rng.random((rows, 3)).astype(np.float32),
                "classes": rng.integers(0, 10, (rows, 3)),
            },
        ),
        Case(
            f"image BYTES[1] ({len(image[0]) // 1000} KB JPEG)",
            Request("img-0000001", "efficientnet-lite0", {"image": image}),
            {
                "scores": rng.random((rows, 5)).astype(np.float32),
                "labels": _bytes_column(rows, [b"tabby cat", b"tiger cat", b"Egyptian cat"] * 2),
            },
        ),
        Case(
            "image tensor UINT8[224,224,3]",
            Request(
                "img-0000002",
                "resnet",
                {"image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)},
            ),
            {"scores": rng.random((rows, 5)).astype(np.float32)},
        ),
    ]


def best_us(fn: Callable[[], object], items: int, repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs, in µs per item."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / items * 1e6


def measure(case: Case, batch: int, repeats: int) -> dict[str, float | None]:
    """µs per request (decode) and per result (encode) for each codec."""
    pure, fast = AvroCodec(compiled=False), AvroCodec()
    values = [pure.encode_request(case.request)] * batch
    schema = pure.request_schema
    rids = [f"req-{i:07d}" for i in range(batch)]
    timings = [(0.5, 0.1, 1.2, 0.05, 2.0)] * batch
    topics = ["tiny.requests"] * batch
    partitions = [i % 4 for i in range(batch)]
    offsets = list(range(10_000_000, 10_000_000 + batch))
    decoded = pure.decode_requests(values[:1])[0]
    assert isinstance(decoded, Request), decoded

    def encode_all(codec: AvroCodec) -> Callable[[], object]:
        def run() -> object:
            results = codec.result_batch(case.request.model, "1", case.columns)
            return results.encode_all(rids, timings, batch, topics, partitions, offsets)

        return run

    def fastavro_results() -> object:
        return [
            pure.encode_result(
                Result(
                    rids[i],
                    case.request.model,
                    "1",
                    Status.OK,
                    {name: col[i] for name, col in case.columns.items()},
                    Timings(*timings[i]),
                    batch,
                    topics[i],
                    partitions[i],
                    offsets[i],
                )
            )
            for i in range(batch)
        ]

    return {
        "decode pure": best_us(lambda: pure.decode_requests(values), batch, repeats),
        "decode compiled": best_us(lambda: fast.decode_requests(values), batch, repeats)
        if COMPILED
        else None,
        "decode fastavro": best_us(
            lambda: [fastavro.schemaless_reader(io.BytesIO(v), schema) for v in values],
            batch,
            repeats,
        ),
        "encode pure": best_us(encode_all(pure), batch, repeats),
        "encode compiled": best_us(encode_all(fast), batch, repeats) if COMPILED else None,
        "encode fastavro": best_us(fastavro_results, batch, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every case and print one table."""
    ap = argparse.ArgumentParser(prog="python -m load.codec", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="passes per figure; the best is kept")
    ap.add_argument("--batch", type=int, default=1000, help="values per pass")
    args = ap.parse_args(argv)
    columns = [
        "decode pure",
        "decode compiled",
        "decode fastavro",
        "encode pure",
        "encode compiled",
        "encode fastavro",
    ]
    print(f"compiled codec: {'built' if COMPILED else 'NOT BUILT (pure-Python fallback)'}")
    print(f"µs per request (decode) / per result (encode), best of {args.repeats} x {args.batch}")
    header = f"{'case':34}" + "".join(f"{c:>17}" for c in [*columns, "compiled d+e"])
    print(header)
    for case in cases(args.batch):
        row = measure(case, args.batch, args.repeats)
        d, e = row["decode compiled"], row["encode compiled"]
        both = None if d is None or e is None else d + e
        cells = [row[c] for c in columns] + [both]
        print(
            f"{case.name:34}"
            + "".join(f"{'not built':>17}" if v is None else f"{v:17.3f}" for v in cells)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

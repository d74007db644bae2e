"""5% of 100,000 requests are hostile: each is a dead letter with its reason, the rest are
served, and memory stays where a clean run of the same size keeps it.

`load.hostile.run_hostile` builds the hostile kinds (oversized tensors, shapes that lie
about their data, JSON nested past the recursion limit, PNG decompression bombs, wrong
datatypes), mixes them at random among ordinary tiny-model requests, and serves the
backlog with ``kp-pipeline run`` in its own process (load/topologies/hostile.yaml).
"""

from __future__ import annotations

from pathlib import Path

from load.hostile import KINDS, run_hostile

REASONS = {
    "oversized": "bad_tensor",
    "huge_shape": "bad_tensor",
    "deep_json": "undecodable",
    "image_bomb": "image_too_large",
    "wrong_datatype": "bad_tensor",
}


def test_hostile_requests_are_dead_letters_and_the_rest_are_served(tmp_path: Path) -> None:
    report = run_hostile(total=100_000, share=0.05, log=tmp_path / "hostile.log")
    tail = (tmp_path / "hostile.log").read_text(errors="replace")[-3000:]
    assert report.pipeline_exit is None, tail  # still serving at the end
    assert (report.hostile, report.missing, report.ordinary_letters) == (5000, 0, 0), report
    assert report.served == 95_000
    for kind in KINDS:
        assert report.letters_by_kind[kind] == {REASONS[kind]: 1000}, (kind, report)


def test_memory_is_bounded_by_the_flow_settings_not_by_how_much_is_hostile(
    tmp_path: Path,
) -> None:
    """5,000 oversized requests (1.25 GiB) cost a bounded excess over a clean backlog.

    The bound, from load/topologies/hostile.yaml: 64 MiB of requests in flight
    (``max_in_flight_bytes``), as much again in their dead letters until the broker takes
    them, librdkafka's prefetch (16 MiB per partition, 4 partitions), and the decoded
    copies of the batch at hand: 4 x 64 MiB.
    """
    clean = run_hostile(total=100_000, share=0.0, log=tmp_path / "clean.log")
    big = run_hostile(total=100_000, share=0.05, kinds=("oversized",), log=tmp_path / "big.log")
    assert clean.served == 100_000
    assert big.letters_by_kind == {"oversized": {"bad_tensor": 5000}}
    assert big.missing == 0
    assert big.rss_peak_mb - clean.rss_peak_mb < 4 * 64, (big, clean)

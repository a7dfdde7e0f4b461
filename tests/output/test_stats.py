"""Merging the generator's per-batch telemetry into part records and the job's stats.json."""

from __future__ import annotations

import json

import pytest

from pipeline.output.stats import Call, JobStats, PartStats, merge_telemetry


def _batch(actor: str, gpu: str, rows: int, calls: list[Call], utilization: float | None) -> str:
    return PartStats.of_batch(
        actor=actor, node="node-" + actor[0], gpu=gpu, device="cuda", rows=rows,
        oom_retries=1 if rows > 3 else 0, stage_seconds={"denoise": 1.0, "vae_decode": 0.5},
        calls=calls, utilization=utilization, gpu_memory_peak_mb=1000.0 + rows,
    ).to_json()  # fmt: skip


def _part(records: list[str | None], rows: int) -> PartStats:
    return PartStats.from_dict({
        "rows": rows, "bytes": 10, "generation_seconds": 1.0, "encode_seconds": 0.1, "upload_seconds": 0.2,
        "peak_memory_mb": 5.0, "actors": {}, "nodes": {},
    }) + merge_telemetry(records)  # fmt: skip


def test_parts_and_batches_merge_exactly() -> None:
    # Actor a: two batches in one part, one in another; actor b: one batch. [images, seconds, end]
    part1 = _part(
        [_batch("a1", "gpu0", 4, [(4, 2.0, 102.0)], 90.0), None, _batch("a1", "gpu0", 2, [(2, 1.0, 104.0)], 60.0)], 6
    )
    part2 = _part(
        [_batch("a1", "gpu0", 2, [(2, 1.0, 110.0)], None), _batch("b2", "gpu1", 3, [(3, 3.0, 103.0)], 100.0)], 5
    )
    assert part1.oom_retries == 1 and part1.stage_seconds == {"denoise": 2.0, "vae_decode": 1.0}
    stats = JobStats()
    stats.add_part(part1)
    stats.add_part(part2)
    record = stats.to_dict(wall_seconds=20.0, manifest_rows=11, extra={})
    a, b = record["per_actor"]["a1"], record["per_actor"]["b2"]
    assert (a["rows"], a["model_calls"], a["busy_seconds"]) == (8, 3, 4.0)
    # Working span of a: first call started at 100, last ended at 110.
    assert a["images_per_second"] == pytest.approx(0.8) and a["busy_fraction"] == pytest.approx(0.4)
    # Utilisation weighted by busy seconds over the batches that had a sample.
    assert a["gpu_utilization_percent"] == pytest.approx((90 * 2 + 60 * 1) / 3, abs=0.05)
    assert a["gpu_memory_peak_mb"] == 1004.0 and b["busy_fraction"] == 1.0
    assert record["model_calls"] == 4 and record["oom_retries"] == 1
    assert record["generation_span_seconds"] == pytest.approx(10.0)
    assert record["generation_images_per_second"] == pytest.approx(1.1)
    assert record["busy_fraction"] == pytest.approx(7.0 / 13.0, abs=1e-4)
    assert record["peak_gpu_memory_mb"] == 1004.0
    # After warm-up: a's first call ended at 102 (4 rows); 4 more rows by 110. b: one call, 3 rows in 3 s.
    assert a["steady_images_per_second"] == pytest.approx(0.5) and b["steady_images_per_second"] == 1.0
    assert record["steady_images_per_second"] == pytest.approx(1.5)
    assert record["gpu_utilization_percent"] == pytest.approx((180 + 60 + 300) / 6, abs=0.05)
    assert set(record["per_node"]) == {"node-a", "node-b"} and record["per_node"]["node-a"]["rows"] == 8
    assert [g["rows"] for g in record["per_gpu"].values()] == [8, 3]
    assert record["stage_seconds"]["upload"] == pytest.approx(0.4)
    assert set(record["batch_latency_seconds"]) == {"p50", "p90", "p99"}


def test_cpu_jobs_have_no_gpu_figures() -> None:
    batch = PartStats.of_batch(actor="x", node="n", gpu="", device="cpu", rows=2, calls=[(2, 1.0, 5.0)]).to_json()
    stats = JobStats()
    stats.add_part(_part([batch], 2))
    record = stats.to_dict(wall_seconds=3.0, manifest_rows=2, extra={})
    assert record["per_gpu"] == {} and record["gpu_utilization_percent"] is None
    assert record["peak_gpu_memory_mb"] is None and record["per_actor"]["x"]["gpu_utilization_percent"] is None


def test_unmatched_lora_layers_are_a_property_of_the_model_not_a_sum() -> None:
    # Every batch of every actor reports the count of the LoRA it loaded (model.allow_partial_lora).
    def batch(actor: str, unmatched: int | None) -> str:
        record = PartStats.of_batch(actor=actor, node="n", gpu="", device="", rows=1, calls=[(1, 1.0, 5.0)])
        record.lora_layers_unmatched = unmatched or 0
        data = record.to_dict()
        if unmatched is None:  # a record without the field
            del data["lora_layers_unmatched"]
        return json.dumps(data)

    first, second = _part([batch("a", 3), batch("a", 3)], 2), _part([batch("b", 3), batch("c", None)], 2)
    assert first.lora_layers_unmatched == 3
    stats = JobStats()
    stats.add_part(first)
    stats.add_part(second)
    older = {key: value for key, value in second.to_dict().items() if key != "lora_layers_unmatched"}
    stats.add_part(PartStats.from_dict(older))  # older record
    assert stats.to_dict(wall_seconds=1.0, manifest_rows=4, extra={})["lora_layers_unmatched"] == 3
    assert JobStats().to_dict(wall_seconds=1.0, manifest_rows=0, extra={})["lora_layers_unmatched"] == 0


def test_latency_percentiles_come_from_a_sketch_within_its_accuracy() -> None:
    """The driver keeps a quantile sketch of the call latencies, not every call: the same size
    after 1,000 parts as after 10, and each percentile within LATENCY_ACCURACY of the exact one."""
    import pickle

    import numpy as np

    from pipeline.output.stats import LATENCY_ACCURACY

    rng = np.random.default_rng(3)
    stats, seconds, sizes = JobStats(), [], {}
    for part in range(1000):
        calls = [(8, float(s), 100.0 + part) for s in rng.lognormal(0.0, 0.4, 60)]
        seconds += [c[1] for c in calls]
        stats.add_part(PartStats(calls=calls))
        if part + 1 in (10, 1000):
            sizes[part + 1] = len(pickle.dumps(stats.latency))
    assert stats.model_calls == 60_000 and stats.totals.calls == []
    assert sizes[1000] <= 2 * sizes[10]
    latency = stats.batch_latency_seconds()
    for p in (50, 90, 99):
        exact = float(np.percentile(seconds, p, method="lower"))
        assert latency[f"p{p}"] == pytest.approx(exact, rel=2 * LATENCY_ACCURACY), p

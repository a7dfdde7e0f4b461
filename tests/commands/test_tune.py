"""`tune`'s logic without Ray: the space, the batch sweep and its stopping rule, the per-type search
over loads, the steady rate over windows, the quality gate, and the choices (spread, fleet)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from pipeline.commands.tuning.plan import LoadRequest, TunePlan
from pipeline.commands.tuning.points import OK, Load, Point, name_bottleneck, steady_span, windowed_rate
from pipeline.commands.tuning.quality import QualityGate, QualityJudge, psnr
from pipeline.commands.tuning.results import TuneSummary, choose, choose_fleet
from pipeline.commands.tuning.space import BatchCandidates, BatchSetting, LoadSetting, SearchSpace
from pipeline.commands.tuning.sweep import Climb, sweep_batches
from pipeline.core.errors import ConfigError
from pipeline.output.stats import PartStats, WorkerStats

BF16 = LoadSetting("bfloat16")


def _point(rate: float, *, batch: int = 4, load: LoadSetting = BF16, spread: float = 0.0, kind: str = "A10G",
           status: str = OK) -> Point:  # fmt: skip
    return Point(kind, load, BatchSetting(batch), status, images_per_second=rate, spread=spread)


# --- the space ------------------------------------------------------------------------------------


def test_the_space_searches_every_switch_on_gpus_and_only_batch_sizes_on_cpu() -> None:
    gpu = SearchSpace.parse(on_gpu=True, flags={})
    assert gpu.dtypes == ("bfloat16", "float16") and gpu.compile == (False, True) and gpu.attention == ("sdpa", "flash")
    assert gpu.batches.batch_sizes == (1, 2, 4, 8, 16) and gpu.actors_per_gpu == (1, 2)
    assert len(gpu.loads_for("A100")) == 2 * 2 * 2 * 2 * 2 * 2
    # No bfloat16 on a T4: those loads are not offered there, and its quality reference is float32.
    assert all(load.dtype == "float16" for load in gpu.loads_for("T4"))
    assert gpu.reference_for("T4") == LoadSetting("float32") and gpu.reference_for("A100") == BF16
    assert not gpu.contains(gpu.reference_for("T4"))  # run for its quality sample only
    cpu = SearchSpace.parse(on_gpu=False, flags={"batch_sizes": "4, 1,4", "vae_batch_sizes": "auto,2"})
    assert cpu.dtypes == ("float32",) and cpu.batches.batch_sizes == (1, 4) and cpu.batches.vae_batch_sizes == (None, 2)
    assert cpu.loads_for("CPU") == [LoadSetting("float32")] and cpu.reference_for("CPU") == LoadSetting("float32")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"batch_sizes": "2,0"}, "--batch-sizes: cannot read '0'"),
        ({"dtypes": "fp8"}, "--dtypes: cannot read 'fp8'"),
        ({"compile": "maybe"}, "--compile: cannot read 'maybe'"),
        ({"attention": "fast"}, "--attention: cannot read 'fast'"),
        ({"actors_per_gpu": ","}, "--actors-per-gpu: no values given"),
        ({"dtypes": "fp16"}, "float16 needs a GPU"),
        ({"reference": "fp16"}, "--reference: fp32 or bf16"),
    ],
)
def test_bad_space_values_are_named(flags: dict[str, str | None], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSpace.parse(on_gpu=False, flags=flags)


def test_neighbours_change_one_dimension_and_flash_needs_16_bits() -> None:
    space = SearchSpace.parse(on_gpu=True, flags={"dtypes": "fp32,bf16", "channels_last": "off"})
    neighbours = space.neighbours(LoadSetting("float32"), "A100")
    assert LoadSetting("float32", attention="flash") not in neighbours  # flash takes fp16/bf16 only
    assert {n.key for n in neighbours} == {"bf16-sdpa-a1", "fp32-sdpa-compiled-a1", "fp32-sdpa-fuse_qkv-a1",
                                           "fp32-sdpa-a2"}  # fmt: skip


# --- the batch sweep ----------------------------------------------------------------------------------


def _measured(rates: dict[int, float], *, oom_above: int = 99) -> tuple[Callable[[BatchSetting], Point], list[int]]:
    asked: list[int] = []

    def measure(batch: BatchSetting) -> Point:
        asked.append(batch.batch_size)
        if batch.batch_size > oom_above:
            return _point(0.0, batch=batch.batch_size, status="infeasible: out of memory")
        return Point("A10G", BF16, batch, OK, images_per_second=rates[batch.batch_size])

    return measure, asked


def test_the_probe_steps_down_from_the_largest_batch_and_records_out_of_memory() -> None:
    measure, asked = _measured({1: 1.0, 2: 1.9, 4: 3.0}, oom_above=4)
    points = sweep_batches(BatchCandidates((1, 2, 4, 8, 16)), measure, mode="quick")
    assert asked[:3] == [16, 8, 4]  # the probe, largest first
    assert [p.status for p in points[:2]] == ["infeasible: out of memory"] * 2 and points[2].ok
    assert sorted(asked[3:]) == [1, 2]  # then the climb below what fits, nothing above it again


def test_the_climb_stops_after_four_steps_in_a_row_under_five_percent() -> None:
    climb = Climb()
    assert climb.add(_point(10.0))
    assert not climb.add(_point(10.4))  # +4 %: a flat step, though the best now
    assert climb.best is not None and climb.best.images_per_second == 10.4
    for _ in range(3):
        assert not climb.add(_point(9.0))
    assert climb.stopped
    measure, asked = _measured({size: 10.0 for size in range(1, 65)})
    sweep_batches(BatchCandidates(tuple(range(1, 65))), measure, mode="quick")
    assert len(asked) == 1 + 4  # the probe's point, then four flat steps


def test_grid_measures_every_feasible_combination() -> None:
    measure, asked = _measured({1: 1.0, 2: 2.0, 4: 3.0}, oom_above=2)
    points = sweep_batches(BatchCandidates((1, 2, 4), vae_batch_sizes=(None, 1)), measure, mode="grid")
    assert asked[:2] == [4, 2] and sorted(asked[2:]) == [1, 1, 2] and len(points) == 5


# --- the search over loads ----------------------------------------------------------------------------


def _load(request: LoadRequest, rate: float, *, passed: bool = True) -> Load:
    point = Point(request.accelerator_type, request.load, BatchSetting(4), OK, images_per_second=rate)
    point.quality_passed = passed
    return Load("t", request.accelerator_type, request.load, points=[point], reference=request.reference)


def test_quick_runs_the_reference_with_its_neighbours_at_once_then_climbs() -> None:
    space = SearchSpace.parse(on_gpu=True, flags={"attention": "sdpa", "fuse_qkv": "off", "channels_last": "off"})
    plan = TunePlan({"A100": 8}, space, mode="quick")
    first = [plan.next() for _ in range(4)]
    keys = [r.load.key for r in first if r]
    assert keys[0] == "bf16-sdpa-a1"  # the reference first: the others' quality is judged against it
    assert set(keys[1:]) == {"bf16-sdpa-compiled-a1", "bf16-sdpa-a2", "fp16-sdpa-a1"}
    assert plan.next() is None and first[0] is not None and first[0].reference
    rates = {"bf16-sdpa-a1": 1.0, "bf16-sdpa-compiled-a1": 1.5, "bf16-sdpa-a2": 1.1}
    rates["fp16-sdpa-a1"] = 1.0
    for request in first:
        assert request is not None
        plan.record(_load(request, rates[request.load.key]))
    following = {r.load.key for r in iter(plan.next, None)}
    assert following == {"bf16-sdpa-compiled-a2", "fp16-sdpa-compiled-a1"}  # the new best's neighbours


def test_a_type_runs_no_more_loads_than_it_has_gpus_and_cached_loads_need_no_trial() -> None:
    space = SearchSpace.parse(on_gpu=True, flags={"compile": "off", "attention": "sdpa", "fuse_qkv": "off",
                                                  "channels_last": "off", "actors_per_gpu": "1"})  # fmt: skip
    plan = TunePlan({"A10G": 1, "T4": 1}, space, mode="grid")
    a, b = plan.next(), plan.next()
    assert a is not None and b is not None and {a.accelerator_type, b.accelerator_type} == {"A10G", "T4"}
    assert plan.next() is None  # one GPU each, both busy
    served = plan.next(cached=lambda request: _load(request, 1.0))
    assert served is None
    plan.record(_load(a, 1.0))
    hit: list[str] = []

    def cached(request: LoadRequest) -> Load:
        hit.append(request.load.key)
        return _load(request, 2.0)

    assert plan.next(cached) is None and hit  # A10G's next load came from the cache


def test_the_fleet_round_measures_each_types_best_pixels_on_the_others() -> None:
    space = SearchSpace.parse(on_gpu=True, flags={"compile": "off", "attention": "sdpa", "fuse_qkv": "off",
                                                  "channels_last": "off", "actors_per_gpu": "1"})  # fmt: skip
    plan = TunePlan({"A100": 2, "H100": 2}, space, mode="quick")
    best = {"A100": "bfloat16", "H100": "float16"}
    while not plan.finished:
        request = plan.next()
        if request is None:
            break
        rate = 2.0 if request.load.dtype == best[request.accelerator_type] else 1.0
        plan.record(_load(request, rate))
    measured = {(load.accelerator_type, load.load.dtype) for load in plan.loads()}
    assert measured == {("A100", "bfloat16"), ("A100", "float16"), ("H100", "bfloat16"), ("H100", "float16")}
    assert plan.finished


# --- measuring --------------------------------------------------------------------------------------


def _record(actor: str, calls: list[tuple[int, float, float]]) -> PartStats:
    worker = WorkerStats.of_calls(calls, node="n", gpu="", device="cpu", rows=sum(c[0] for c in calls),
                                  utilization=None, gpu_memory_peak_mb=None)  # fmt: skip
    return PartStats(calls=calls, workers={actor: worker})


def test_the_steady_rate_leaves_out_warm_up_and_has_a_spread() -> None:
    # A warm-up call of 10 s, then calls of 4 images every second, then every 2 seconds.
    calls = [(4, 10.0, 10.0)] + [(4, 1.0, 10.0 + k) for k in range(1, 7)]
    calls += [(4, 2.0, 16.0 + 2 * k) for k in range(1, 4)]
    start, end = steady_span([_record("a", calls)])
    assert (start, end) == (10.0, 22.0)
    mean, spread, windows = windowed_rate([_record("a", calls)])
    assert windows == pytest.approx([4.0, 3.0, 2.0]) and mean == pytest.approx(3.0) and spread == pytest.approx(1.0)
    single = windowed_rate([_record("a", [(4, 2.0, 5.0)])])
    assert single == (2.0, 0.0, [2.0])  # one call: images per busy second, no spread


def test_the_bottleneck_is_named_only_when_the_generator_waits() -> None:
    cpus = {"encode": 1.0, "write": 1.0}
    stages = {"encode": 40.0, "upload": 1.0}
    assert name_bottleneck(busy=0.95, rate=1.0, stage_seconds=stages, rows=10, cpus=cpus) is None
    assert name_bottleneck(busy=0.5, rate=1.0, stage_seconds=stages, rows=10, cpus=cpus) == "encode"
    quick = {"encode": 0.1, "upload": 0.1}
    assert name_bottleneck(busy=0.5, rate=1.0, stage_seconds=quick, rows=10, cpus=cpus) == "read"


# --- the quality gate ---------------------------------------------------------------------------------


def test_the_judge_compares_with_its_types_reference_even_when_it_comes_later() -> None:
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, 3000, dtype=np.uint8)
    close = np.clip(reference.astype(int) + rng.integers(-2, 3, 3000), 0, 255).astype(np.uint8)
    judge = QualityJudge(QualityGate("psnr", 30.0))
    judge.submit("A10G", "fp16", close, reference=False)
    judge.submit("A10G", "eager", 255 - reference, reference=False)
    assert judge.verdict("A10G", "fp16") is None  # waiting for the reference
    judge.submit("A10G", "bf16", reference, reference=True)
    fp16, broken = judge.verdict("A10G", "fp16"), judge.verdict("A10G", "eager")
    assert fp16 is not None and fp16["passed"] and fp16["value"] > 40
    assert broken is not None and not broken["passed"] and broken["value"] < 10
    assert judge.verdict("A10G", "bf16") == {"metric": "psnr", "value": None, "passed": True, "reference": "bf16"}
    assert math.isinf(psnr(reference, reference))
    mad = QualityGate.parse("mad:1.5")
    assert mad.measure(close, reference)[1] and not mad.measure(255 - reference, reference)[1]
    with pytest.raises(ConfigError, match="--quality: 'ssim' is not a metric"):
        QualityGate.parse("ssim")


# --- choosing -----------------------------------------------------------------------------------------


def test_the_simpler_setting_wins_within_the_spread() -> None:
    compiled = LoadSetting("bfloat16", compile=True)
    fast = _point(10.2, load=compiled, spread=0.5)
    plain = _point(10.0, spread=0.3)
    choice = choose([fast, plain])
    assert choice is not None and choice.point is plain and "simplest within the spread" in choice.reason
    clear = choose([_point(12.0, load=compiled, spread=0.5), plain])
    assert clear is not None and clear.point.load == compiled and clear.reason == "fastest"
    rejected = _point(20.0, load=compiled)
    rejected.quality_passed = False
    again = choose([rejected, plain])
    assert again is not None and again.point is plain  # the fastest setting is never a broken one


def test_the_fleet_runs_one_pixel_setting_on_every_type() -> None:
    fp16 = LoadSetting("float16")
    points = [
        _point(3.0, kind="A10G"), _point(3.5, kind="A10G", load=fp16),
        _point(10.0, kind="H100"), _point(9.0, kind="H100", load=fp16),
        _point(50.0, kind="H100", load=LoadSetting("float16", compile=True)),  # not measured on A10G
    ]  # fmt: skip
    fleet, choices = choose_fleet(points, {"A10G": 16, "H100": 1})
    assert fleet is not None and fleet["dtype"] == "float16" and fleet["compile"] is False  # 16x3.5+9 > 16x3+10
    assert fleet["images_per_second"] == pytest.approx(16 * 3.5 + 9.0)
    assert choices["H100"].point.images_per_second == 9.0
    summary = TuneSummary([Load("x", "A10G", BF16, points=[_point(1.0, kind="A10G")])], {"A10G": 1, "H100": 1})
    summary.decide(min_images_per_second=None)
    assert summary.fleet is None and summary.types_without_fleet() == ["A10G", "H100"]
    summary = TuneSummary([Load("x", "A10G", BF16, points=[_point(1.0, kind="A10G")])], {"A10G": 1})
    summary.decide(min_images_per_second=2.0)
    assert summary.per_type["A10G"] is None and "under --min-images-per-second" in summary.points[0].note

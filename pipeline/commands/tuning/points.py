"""What `tune` measures: a *point* per batch setting on a loaded model, a *load* per model loaded.

A `Point` is one measurement: the job's stages (read, generate, encode, write to a scratch output)
over the whole sample, on one GPU, with one load setting and one batch setting. Its rate is the
steady images/s of the GPU after each actor's first (warm-up) call, measured over repeated
windows (`windowed_rate`) so that it comes with its spread. A `Load` is one Ray Tune trial: the
model loaded once with one load setting on one GPU of one type, and the points measured on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.commands.tuning.space import BatchSetting, LoadSetting

if TYPE_CHECKING:
    from pipeline.output.stats import PartStats

OK = "ok"
INFEASIBLE = "infeasible"  # out of memory, over --max-memory-fraction, no bfloat16: recorded, never a failure
FAILED = "failed"
WINDOWS = 3  # repeated windows per measurement
BUSY_TARGET = 0.9  # below it, the generator waits on another stage: which one is named


@dataclass
class Point:
    """One measurement of a batch setting on a loaded model."""

    accelerator_type: str
    load: LoadSetting
    batch: BatchSetting
    status: str  # `ok`, or `infeasible: why` / `failed: why`
    images_per_second: float = 0.0  # steady, per GPU: the mean of the windows' rates
    spread: float = 0.0  # half the range of the windows' rates
    windows: list[float] = field(default_factory=list)
    rows: int = 0
    model_calls: int = 0
    warmup_seconds: float = 0.0  # the actors' first calls (CUDA kernels, torch.compile): start-up, not rate
    peak_memory_mb: float | None = None
    memory_fraction: float | None = None  # of the GPU's memory (None on CPU)
    busy_fraction: float | None = None
    bottleneck: str | None = None  # the stage the generator waited on (busy < BUSY_TARGET)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # epoch seconds
    ended_at: float = 0.0
    node_id: str = ""
    load_id: str = ""  # the Ray Tune trial (one model load) that measured it
    cached: bool = False
    quality: float | None = None  # the load's difference to the reference (`quality`), per point for the tables
    quality_passed: bool | None = None
    cost_per_1000: float | None = None
    note: str = ""  # why a point was not chosen though it ran (quality, --min-images-per-second, memory)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def infeasible(self) -> bool:
        return self.status.startswith(INFEASIBLE)

    @property
    def eligible(self) -> bool:
        """Measured, within the constraints and through the quality gate (not known yet: eligible)."""
        return self.ok and not self.note and self.quality_passed is not False

    def complexity(self) -> tuple[Any, ...]:
        return (*self.load.complexity(), *self.batch.complexity())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = {**data.pop("load"), **data.pop("batch")}
        data["load_key"], data["batch_key"] = self.load.key, self.batch.key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        data = dict(data)
        settings = data.pop("settings")
        data.pop("load_key", None)
        data.pop("batch_key", None)
        fields = {name for name in cls.__dataclass_fields__ if name not in ("load", "batch")}
        return cls(
            load=LoadSetting.from_dict(settings),
            batch=BatchSetting.from_dict(settings),
            **{key: value for key, value in data.items() if key in fields},
        )


@dataclass
class Load:
    """One Ray Tune trial: the model loaded with one load setting on one GPU, and its points."""

    load_id: str
    accelerator_type: str
    load: LoadSetting
    status: str = OK
    node_id: str = ""
    gpu: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    load_seconds: float = 0.0  # the slowest actor's load
    loads: int = 0  # models loaded (one per actor)
    reference: bool = False  # the quality gate's reference on its type
    in_space: bool = True  # a reference outside the searched space renders only the quality sample
    quality: dict[str, Any] | None = None  # the judge's verdict (`quality.Verdict.to_dict`)
    cached: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def best_rate(self) -> float:
        return max((p.images_per_second for p in self.points if p.eligible), default=0.0)

    def largest_fitting_batch(self) -> int | None:
        return max((p.batch.batch_size for p in self.points if p.ok), default=None)

    def to_dict(self, *, with_points: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = data.pop("load")
        data["load_key"] = self.load.key
        data["points"] = [p.to_dict() for p in self.points] if with_points else len(self.points)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Load:
        data = dict(data)
        points = [Point.from_dict(p) for p in data.pop("points", [])]
        load = LoadSetting.from_dict(data.pop("settings"))
        data.pop("load_key", None)
        fields = {name for name in cls.__dataclass_fields__ if name not in ("load", "points")}
        return cls(load=load, points=points, **{key: value for key, value in data.items() if key in fields})


def steady_span(records: list[PartStats]) -> tuple[float, float]:
    """(start, end) of the span in which every actor was past its first call and still rendering:
    from the last actor's first call's end to the first actor's last call's end."""
    by_actor: dict[str, tuple[float, float]] = {}
    for record in records:
        for actor, w in record.workers.items():
            first, last = by_actor.get(actor, (math.inf, -math.inf))
            by_actor[actor] = (min(first, w.first_end), max(last, w.last_end))
    if not by_actor:
        return 0.0, 0.0
    return max(first for first, _ in by_actor.values()), min(last for _, last in by_actor.values())


def windowed_rate(records: list[PartStats], windows: int = WINDOWS) -> tuple[float, float, list[float]]:
    """Steady images/s over `windows` equal windows of the steady span (`steady_span`); each
    model call counts in a window for the share of its time inside it. Returns (mean, half the
    range, the windows' rates). A span too short for a window after warm-up (a single call per
    actor) falls back to images per busy second, without a spread."""
    calls = [call for record in records for call in record.calls]
    start, end = steady_span(records)
    if end - start <= 0:
        busy = sum(seconds for _, seconds, _ in calls)
        rate = sum(images for images, _, _ in calls) / busy if busy > 0 else 0.0
        return rate, 0.0, [rate] if rate else []
    width = (end - start) / windows
    rates = []
    for k in range(windows):
        lo, hi = start + k * width, start + (k + 1) * width
        images = 0.0
        for count, seconds, ended in calls:
            began = ended - seconds
            overlap = min(hi, ended) - max(lo, began)
            if overlap > 0 and seconds > 0:
                images += count * overlap / seconds
        rates.append(images / width)
    mean = sum(rates) / len(rates)
    return mean, (max(rates) - min(rates)) / 2, rates


def warmup_seconds(records: list[PartStats]) -> float:
    """How much longer the actors' first calls took than their steady calls of the same size:
    CUDA's kernels and torch.compile, paid once per load (and per batch size when compiled)."""
    firsts: dict[str, tuple[float, int]] = {}
    for record in records:
        for actor, w in record.workers.items():
            if w.first_end < firsts.get(actor, (math.inf, 0))[0]:
                firsts[actor] = (w.first_end, w.first_rows)
    calls = [call for record in records for call in record.calls]
    extra = 0.0
    for first_end, rows in firsts.values():
        first = [c for c in calls if abs(c[2] - first_end) < 1e-6]
        rest = [c[1] / c[0] for c in calls if abs(c[2] - first_end) >= 1e-6 and c[0]]
        if first and rest:
            extra = max(extra, first[0][1] - rows * sorted(rest)[len(rest) // 2])
    return max(0.0, extra)


def name_bottleneck(
    *, busy: float | None, rate: float, stage_seconds: dict[str, float], rows: int, cpus: dict[str, float]
) -> str | None:
    """The stage the generator waited on, when it was busy less than BUSY_TARGET of its span: of
    encode and write, the one whose CPU-seconds per image over the CPUs it may use come closest to
    the time per image the GPU would need (1 / `rate`); `read` (or Ray Data's scheduling) when
    neither explains the wait."""
    if busy is None or busy >= BUSY_TARGET or rows <= 0 or rate <= 0:
        return None
    demands = {
        stage: stage_seconds.get(key, 0.0) / rows / max(cpus.get(stage, 1.0), 1e-9)
        for stage, key in (("encode", "encode"), ("write", "upload"))
    }
    stage, demand = max(demands.items(), key=lambda item: item[1])
    return stage if demand >= 0.5 / rate else "read"

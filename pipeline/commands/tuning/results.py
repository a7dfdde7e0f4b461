"""What `tune` concludes: the best setting per GPU type, the one fleet setting, and what it writes.

Best, per type, is the eligible point (measured, within `--max-memory-fraction` and
`--min-images-per-second`, through the quality gate) with the highest steady rate, except that a
point is called best only when it beats the next by more than their spread: among the points
within the spread of the fastest, the simplest wins (fewer switches, fewer actors, smaller
batches), and the table says so.

A fleet runs one setting of what changes pixels (`space.PIXEL_KEYS`) on every type: the one,
among those measured eligible on every type, whose fleet (each type's best point with it, times
the type's GPUs) renders the most images per second. Its per-type points become the `fleet:`
section of the written config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.commands.tuning.points import Load, Point
from pipeline.commands.tuning.space import CPU


@dataclass
class Choice:
    """The chosen point of a type, and why."""

    point: Point
    reason: str  # "fastest", or "simplest within the spread of <the fastest>"
    runner_up: Point | None = None

    def to_dict(self, *, gpus: int, price: float | None, startup: float) -> dict[str, Any]:
        return {
            **self.point.to_dict(),
            "reason": self.reason,
            "gpus": gpus,
            "price": price,
            "startup_seconds": round(startup, 3),
        }


def apply_constraints(points: list[Point], *, min_images_per_second: float | None) -> None:
    """Note the points that ran but may not be chosen: under the minimum rate."""
    for point in points:
        if point.ok and min_images_per_second is not None and point.images_per_second < min_images_per_second:
            point.note = f"under --min-images-per-second {min_images_per_second:g}"


def apply_quality(loads: list[Load]) -> None:
    """Copy each load's quality verdict to its points, and note the points it rejects."""
    for load in loads:
        verdict = load.quality or {}
        for point in load.points:
            point.quality = verdict.get("value")
            point.quality_passed = verdict.get("passed")
            if point.ok and verdict and not verdict.get("passed"):
                shown = "inf" if verdict.get("value") is None else f"{verdict['value']:.2f}"
                point.note = point.note or f"rejected by the quality gate ({verdict['metric']} {shown})"


def choose(points: list[Point]) -> Choice | None:
    """The best eligible point (see the module docstring), or None."""
    eligible = sorted((p for p in points if p.eligible), key=lambda p: -p.images_per_second)
    if not eligible:
        return None
    fastest = eligible[0]
    close = [p for p in eligible if fastest.images_per_second - p.images_per_second <= max(fastest.spread, p.spread)]
    simplest = min(close, key=Point.complexity)
    runner_up = eligible[1] if len(eligible) > 1 else None
    if simplest is fastest:
        return Choice(fastest, "fastest" if len(close) == 1 else "fastest and simplest within the spread", runner_up)
    return Choice(simplest, f"simplest within the spread of {fastest.load.key} {fastest.batch.key}", fastest)


def choose_fleet(points: list[Point], gpus: dict[str, int]) -> tuple[dict[str, Any] | None, dict[str, Choice]]:
    """The pixel setting for the whole fleet and each type's choice with it (see the module
    docstring). (None, {}) when no pixel setting was measured eligible on every type."""
    by_pixels: dict[tuple[Any, ...], dict[str, list[Point]]] = {}
    for point in points:
        if point.eligible:
            by_pixels.setdefault(point.load.pixels, {}).setdefault(point.accelerator_type, []).append(point)
    best: tuple[float, tuple[Any, ...], dict[str, Choice]] | None = None
    for pixels, per_type in by_pixels.items():
        if set(per_type) != set(gpus):
            continue
        choices = {name: choice for name, found in per_type.items() if (choice := choose(found)) is not None}
        total = sum(gpus[name] * choice.point.images_per_second for name, choice in choices.items())
        if best is None or total > best[0]:
            best = (total, pixels, choices)
    if best is None:
        return None, {}
    total, _, choices = best
    pixel_dict = next(iter(choices.values())).point.load.pixel_dict()
    return {**pixel_dict, "images_per_second": round(total, 4)}, choices


@dataclass
class TuneSummary:
    """Every load and point of a `tune` run, with its choices."""

    loads: list[Load]
    gpus: dict[str, int]  # GPUs per type the trials ran on (1 for CPU)
    per_type: dict[str, Choice | None] = field(default_factory=dict)
    fleet: dict[str, Any] | None = None
    fleet_choices: dict[str, Choice] = field(default_factory=dict)

    @property
    def points(self) -> list[Point]:
        return [point for load in self.loads for point in load.points]

    def decide(self, *, min_images_per_second: float | None) -> None:
        apply_quality(self.loads)
        apply_constraints(self.points, min_images_per_second=min_images_per_second)
        for name in self.gpus:
            self.per_type[name] = choose([p for p in self.points if p.accelerator_type == name])
        self.fleet, self.fleet_choices = choose_fleet(self.points, self.gpus)

    def startup_seconds(self, point: Point) -> float:
        """Model load plus the first calls' warm-up of the point's load: what a job pays to start."""
        load = next((load for load in self.loads if load.load_id == point.load_id), None)
        return (load.load_seconds if load else 0.0) + point.warmup_seconds

    def types_without_fleet(self) -> list[str]:
        return [name for name in self.gpus if name not in self.fleet_choices]

    @property
    def on_cpu(self) -> bool:
        return list(self.gpus) == [CPU]

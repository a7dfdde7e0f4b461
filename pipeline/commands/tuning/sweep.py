"""The search over one loaded model's batch settings (no reload), and its stopping rule.

First a memory probe, as vLLM steps memory down until nothing runs out of it: the largest batch
size first, then the next smaller one, until one fits (a size that runs out of memory, or over
`--max-memory-fraction`, is *infeasible*: recorded, never a failure). Then either every feasible
combination (`grid`) or a hill-climb (`quick`) over the batch sizes below the one that fit, then
the VAE chunks, then the encode CPUs, each step from the best point so far, that stops when
PATIENCE steps in a row gain under MIN_GAIN, Triton Model Analyzer's rule. The encode CPUs are
tried only when the generator waited on encoding: otherwise they cannot help.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

from pipeline.commands.tuning.points import Point
from pipeline.commands.tuning.space import BatchCandidates, BatchSetting

PATIENCE = 4  # steps in a row ...
MIN_GAIN = 0.05  # ... that gain under 5 % end a climb

Measure = Callable[[BatchSetting], Point]


class Climb:
    """The stopping rule of a hill-climb: PATIENCE measurements in a row that gain under MIN_GAIN
    over the best so far end it. `best`: the eligible point with the highest rate."""

    def __init__(self, patience: int = PATIENCE, min_gain: float = MIN_GAIN):
        self.patience, self.min_gain = patience, min_gain
        self.best: Point | None = None
        self.flat = 0

    @property
    def stopped(self) -> bool:
        return self.flat >= self.patience

    def add(self, point: Point) -> bool:
        """Count one measurement; True when it is the new best by at least MIN_GAIN."""
        if point.eligible:
            rate = point.images_per_second
            if self.best is None or rate >= self.best.images_per_second * (1 + self.min_gain):
                self.best, self.flat = point, 0
                return True
            if rate > self.best.images_per_second:
                self.best = point  # faster, but by less than MIN_GAIN: still a flat step
        self.flat += 1
        return False


def probe(candidates: BatchCandidates, measure: Measure) -> tuple[list[Point], int | None]:
    """The largest batch size first, then smaller ones, until one runs (the points, and the size
    that ran); anything but running out of memory (or over the memory limit) ends the probe."""
    points = []
    vae, encode = candidates.vae_batch_sizes[0], candidates.encode_cpus[0]
    for size in sorted(candidates.batch_sizes, reverse=True):
        point = measure(BatchSetting(size, vae, encode))
        points.append(point)
        if point.ok:
            return points, size
        if not point.infeasible:
            break
    return points, None


def sweep_batches(candidates: BatchCandidates, measure: Measure, *, mode: str) -> list[Point]:
    """Measure the batch settings of one loaded model (`measure` runs one), as the module says."""
    points, fit = probe(candidates, measure)
    if fit is None:
        return points
    sizes = [b for b in candidates.batch_sizes if b <= fit]
    done = {p.batch for p in points}
    if mode == "grid":
        for size, vae, encode in itertools.product(sizes, candidates.vae_batch_sizes, candidates.encode_cpus):
            setting = BatchSetting(size, vae, encode)
            if setting not in done:
                points.append(measure(setting))
        return points
    climb = Climb()
    climb.add(points[-1])
    steps: list[Callable[[BatchSetting], list[BatchSetting]]] = [
        lambda best: [replace(best, batch_size=b) for b in sorted(sizes, reverse=True)],
        lambda best: [replace(best, vae_batch_size=v) for v in candidates.vae_batch_sizes],
        lambda best: [replace(best, encode_cpus_per_gpu=e) for e in candidates.encode_cpus],
    ]
    for index, settings_of in enumerate(steps):
        best = climb.best or points[-1]
        if index == 2 and best.bottleneck != "encode":
            break  # more encode CPUs help only a generator that waits on encoding
        for setting in settings_of(best.batch):
            if climb.stopped:
                return points
            if setting in done:
                continue
            done.add(setting)
            point = measure(setting)
            points.append(point)
            climb.add(point)
    return points

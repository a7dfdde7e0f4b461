"""The report's figures, from the per-part stats records of every run."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.output.stats import PERCENTILES

# Generator phases, in pipeline order, with the names the report shows.
PHASES = {"text_encode": "Text encode", "denoise": "Denoise (UNet)", "vae_decode": "VAE decode", "to_host": "To host"}


@dataclass(frozen=True)
class ActorSummary:
    """One generator actor over every part: what the per-actor chart and table show."""

    actor: str
    node: str
    gpu: str
    rows: int
    calls: int
    busy_seconds: float
    span_seconds: float
    gpu_utilization_percent: float | None
    gpu_memory_peak_mb: float | None

    @property
    def images_per_second(self) -> float:
        return self.rows / self.span_seconds if self.span_seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float | None:
        return min(1.0, self.busy_seconds / self.span_seconds) if self.span_seconds > 0 else None


@dataclass(frozen=True)
class ThroughputSeries:
    """Images finished over time (seconds since the first model call started)."""

    finished_at: np.ndarray  # end of each call, sorted
    cumulative: np.ndarray  # images finished by then
    bin_edges: np.ndarray
    images_per_second: np.ndarray  # one value per bin

    @property
    def span(self) -> float:
        return float(self.bin_edges[-1] - self.bin_edges[0]) if len(self.bin_edges) else 0.0


def call_table(parts: list[dict[str, Any]]) -> np.ndarray:
    """Every model call of every part as rows of (images, seconds, end epoch)."""
    calls = [call[:3] for part in parts for call in part.get("calls") or [] if len(call) >= 3]
    return np.asarray(calls, dtype=np.float64).reshape(-1, 3)


def throughput_series(parts: list[dict[str, Any]], *, max_bins: int = 80) -> ThroughputSeries | None:
    """Cumulative images at each call's end, and images/s in time bins. A call's images are
    spread over its duration, so bins shorter than a call show the rate, not batch-end spikes."""
    calls = call_table(parts)
    if not len(calls):
        return None
    images, seconds, ends = calls[:, 0], np.maximum(calls[:, 1], 0.0), calls[:, 2]
    starts = ends - seconds
    t0 = float(starts.min())
    order = np.argsort(ends, kind="stable")
    span = max(float(ends.max()) - t0, 1e-6)
    typical = float(np.median(seconds)) or span
    bins = int(min(max_bins, max(10, round(span / typical))))
    edges = np.linspace(0.0, span, bins + 1)
    done = np.zeros(bins + 1)
    for chunk in range(0, len(calls), 20_000):  # calls x edges at a time, bounded memory
        s, e = starts[chunk : chunk + 20_000, None] - t0, ends[chunk : chunk + 20_000, None] - t0
        fraction = np.clip((edges[None, :] - s) / np.maximum(e - s, 1e-9), 0.0, 1.0)
        done += (fraction * images[chunk : chunk + 20_000, None]).sum(axis=0)
    return ThroughputSeries(
        finished_at=ends[order] - t0,
        cumulative=np.cumsum(images[order]),
        bin_edges=edges,
        images_per_second=np.diff(done) / np.diff(edges),
    )


def actor_summaries(parts: list[dict[str, Any]]) -> list[ActorSummary]:
    """Each generator actor over every part (from its first call's start to its last call's end)."""
    merged: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"node": "", "gpu": "", "rows": 0, "calls": 0, "busy": 0.0, "start": math.inf, "end": -math.inf,
                 "util_seconds": 0.0, "util_sum": 0.0, "peak": None}
    )  # fmt: skip
    for part in parts:
        for actor, worker in (part.get("workers") or {}).items():
            m = merged[actor]
            m["node"], m["gpu"] = str(worker.get("node") or m["node"]), str(worker.get("gpu") or m["gpu"])
            m["rows"] += int(worker.get("rows", 0))
            m["calls"] += int(worker.get("calls", 0))
            m["busy"] += float(worker.get("busy_seconds", 0.0))
            m["start"] = min(m["start"], float(worker.get("first_start", math.inf)))
            m["end"] = max(m["end"], float(worker.get("last_end", -math.inf)))
            m["util_seconds"] += float(worker.get("utilization_seconds") or 0.0)
            m["util_sum"] += float(worker.get("utilization_sum") or 0.0)
            if worker.get("gpu_memory_peak_mb") is not None:
                m["peak"] = max(m["peak"] or 0.0, float(worker["gpu_memory_peak_mb"]))
    summaries = [
        ActorSummary(
            actor=actor,
            node=m["node"],
            gpu=m["gpu"],
            rows=m["rows"],
            calls=m["calls"],
            busy_seconds=m["busy"],
            span_seconds=m["end"] - m["start"] if m["end"] > m["start"] else 0.0,
            gpu_utilization_percent=m["util_sum"] / m["util_seconds"] if m["util_seconds"] else None,
            gpu_memory_peak_mb=m["peak"],
        )
        for actor, m in merged.items()
    ]
    return sorted(summaries, key=lambda a: (a.node, a.actor))


def stage_breakdown(parts: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Busy seconds per stage, summed over every part and actor, in pipeline order."""
    phases: dict[str, float] = defaultdict(float)
    for part in parts:
        for phase, seconds in (part.get("stage_seconds") or {}).items():
            phases[phase] += float(seconds)
    generate = sum(float(p.get("generation_seconds", 0.0)) for p in parts)
    stages = [(PHASES[p], phases.pop(p)) for p in PHASES if p in phases]
    stages += [(p.replace("_", " ").capitalize(), s) for p, s in sorted(phases.items())]
    other = generate - sum(s for _, s in stages)
    if other > 0.01 * max(generate, 1e-9):  # time in the generator outside the timed phases
        stages.append(("Other generation", other))
    stages.append(("Image encoding", sum(float(p.get("encode_seconds", 0.0)) for p in parts)))
    stages.append(("Upload", sum(float(p.get("upload_seconds", 0.0)) for p in parts)))
    return stages


def summarise_parts(parts: list[dict[str, Any]], job: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of `stats.json` rebuilt from the part records, for an output without one
    (a run that was interrupted): wall time runs from the first model call to the last commit."""
    calls = call_table(parts)
    rows = sum(int(p.get("rows", 0)) for p in parts)
    generation = sum(float(p.get("generation_seconds", 0.0)) for p in parts)
    actors = actor_summaries(parts)
    summary: dict[str, Any] = {
        "rows": rows,
        "parts": len(parts),
        "bytes": sum(int(p.get("bytes", 0)) for p in parts),
        "model_calls": len(calls),
        "seconds_per_image": generation / rows if rows else 0.0,
        "peak_memory_mb": max((float(p.get("peak_memory_mb", 0.0)) for p in parts), default=0.0),
        "oom_retries": sum(int(p.get("oom_retries", 0)) for p in parts),
        "prompts_truncated": sum(int(p.get("prompts_truncated", 0)) for p in parts),
    }
    if len(calls):
        start, end = float((calls[:, 2] - calls[:, 1]).min()), float(calls[:, 2].max())
        committed = max((float(p.get("committed_at", end)) for p in parts), default=end)
        summary["wall_seconds"] = max(committed, end) - start
        summary["images_per_second"] = rows / summary["wall_seconds"] if summary["wall_seconds"] > 0 else 0.0
        summary["generation_images_per_second"] = rows / (end - start) if end > start else 0.0
        values = np.percentile(calls[:, 1], PERCENTILES)
        summary["batch_latency_seconds"] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
    spans = sum(a.span_seconds for a in actors)
    summary["busy_fraction"] = min(1.0, sum(a.busy_seconds for a in actors) / spans) if spans > 0 else None
    peaks = [a.gpu_memory_peak_mb for a in actors if a.gpu_memory_peak_mb is not None]
    summary["peak_gpu_memory_mb"] = max(peaks) if peaks else None
    utilized = [(a.gpu_utilization_percent, a.busy_seconds) for a in actors if a.gpu_utilization_percent is not None]
    weight = sum(w for _, w in utilized)
    summary["gpu_utilization_percent"] = sum(u * w for u, w in utilized) / weight if weight else None
    config = (job or {}).get("config") or {}
    summary["manifest_rows"] = (job or {}).get("manifest_rows")
    summary["batch_size"] = (config.get("generation") or {}).get("batch_size")
    summary["actors"] = (config.get("resources") or {}).get("actors")
    summary["layout"] = (config.get("write") or {}).get("layout")
    return summary

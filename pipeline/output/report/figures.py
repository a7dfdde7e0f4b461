"""The report's figures, from the per-part stats records of every run.

The records are added up by `PartStats` and summarised by `JobStats`, as the driver does for
`stats.json`, so the page shows the same busy fraction, utilisation and percentiles; only the
throughput over time needs each model call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.output.stats import JobStats, PartStats, WorkerStats

# Generator phases, in pipeline order, with the names the report shows.
PHASES = {"text_encode": "Text encode", "denoise": "Denoise (UNet)", "vae_decode": "VAE decode", "to_host": "To host"}
# The figures a summary leaves out where the parts recorded no model call (older versions).
UNTIMED = ("wall_seconds", "images_per_second", "generation_images_per_second")


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


def call_table(parts: list[PartStats]) -> np.ndarray:
    """Every model call of every part as rows of (images, seconds, end epoch)."""
    return np.asarray([call for part in parts for call in part.calls], dtype=np.float64).reshape(-1, 3)


def throughput_series(parts: list[PartStats], *, max_bins: int = 80) -> ThroughputSeries | None:
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


def actor_summaries(total: PartStats) -> list[tuple[str, WorkerStats]]:
    """Each generator actor over every part (from its first call's start to its last call's end),
    by node, then actor."""
    return sorted(total.workers.items(), key=lambda item: (item[1].node, item[0]))


def stage_breakdown(parts: list[PartStats]) -> list[tuple[str, float]]:
    """Busy seconds per stage, summed over every part and actor, in pipeline order."""
    total = PartStats.total(parts)
    phases = dict(total.stage_seconds)
    stages = [(PHASES[p], phases.pop(p)) for p in PHASES if p in phases]
    stages += [(p.replace("_", " ").capitalize(), s) for p, s in sorted(phases.items())]
    other = total.generation_seconds - sum(s for _, s in stages)
    if other > 0.01 * max(total.generation_seconds, 1e-9):  # time in the generator outside the timed phases
        stages.append(("Other generation", other))
    stages.append(("Image encoding", total.encode_seconds))
    stages.append(("Upload", total.upload_seconds))
    return stages


def summarise_parts(parts: list[PartStats], job: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of `stats.json` rebuilt from the part records, for an output without one
    (a run that was interrupted): wall time runs from the first model call to the last commit."""
    config = (job or {}).get("config") or {}
    extra = {
        "manifest_rows": (job or {}).get("manifest_rows"),
        "batch_size": (config.get("generation") or {}).get("batch_size"),
        "actors": (config.get("resources") or {}).get("actors"),
        "layout": (config.get("write") or {}).get("layout"),
    }
    stats = JobStats.of_parts(parts)
    calls = call_table(parts)
    if not len(calls):  # no model call recorded: no time, nothing per second
        summary = stats.to_dict(wall_seconds=0.0, manifest_rows=0, extra=extra)
        return {key: value for key, value in summary.items() if key not in UNTIMED}
    start, end = float((calls[:, 2] - calls[:, 1]).min()), float(calls[:, 2].max())
    committed = max((end if p.committed_at is None else p.committed_at for p in parts), default=end)
    return stats.to_dict(wall_seconds=max(committed, end) - start, manifest_rows=0, extra=extra)

"""The report's figures, from the per-part stats records of every run, read one at a time.

A `PartsDigest` adds the records up as they are read: `JobStats` (the sums the driver makes for
`stats.json`, so the page shows the same busy fraction, utilisation and latency percentiles) and a
`CallTimeline` of every model call (the throughput over time). Neither keeps the calls themselves:
a 100-million-row job has some 200,000 records and 12 million calls, and the report's memory must
not grow with them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.output.stats import JobStats, PartStats, WorkerStats

# Generator phases, in pipeline order, with the names the report shows.
PHASES = {"text_encode": "Text encode", "denoise": "Denoise (UNet)", "vae_decode": "VAE decode", "to_host": "To host"}
# The figures a summary leaves out where the parts recorded no model call (older versions).
UNTIMED = ("wall_seconds", "images_per_second", "generation_images_per_second")


class CallTimeline:
    """Images finished over time, from model calls added in any order, in at most MAX_BINS time
    bins: the bins start 1/1024 s wide and double in width whenever the calls seen so far span more
    than MAX_BINS of them (a day-long job ends with bins of about 2 s, a few hundred per bin of
    the plot). Per bin it keeps the images whose call ended in it (the cumulative curve) and each
    call's images spread evenly over its duration (the rate, exact per bin)."""

    MAX_BINS = 1 << 16

    def __init__(self) -> None:
        self.width = 2.0**-10  # seconds per bin; bin i covers [i * width, (i + 1) * width) epoch seconds
        self.first = 0  # the index of the first bin held
        self.finished = np.zeros(0)
        self.spread = np.zeros(0)
        self.start = math.inf  # the first call's start and the last one's end, exact
        self.end = -math.inf
        self.images = 0.0

    def add(self, calls: np.ndarray) -> None:
        """Calls as rows of (images, seconds, end epoch)."""
        if not len(calls):
            return
        images, ends = calls[:, 0], calls[:, 2]
        starts = ends - np.maximum(calls[:, 1], 0.0)
        self.start, self.end = min(self.start, float(starts.min())), max(self.end, float(ends.max()))
        self.images += float(images.sum())
        lo, hi = self._cover(float(starts.min()), float(ends.max()))
        origin = lo * self.width  # local times: no cancellation against epoch seconds
        s, e = starts - origin, ends - origin
        n = hi - lo + 1
        np.add.at(self.finished, self._index(e, n) + (lo - self.first), images)
        # Images done by bin edge j (t_j = j * width), summed over calls: t_j * A_j - B_j, with A the
        # rates of the calls running at t_j and B their rate-weighted start offsets (prefix sums).
        timed = e > s
        rate = images[timed] / (e[timed] - s[timed])
        after_start = self._index(s[timed], n) + 1  # the first edge after each start
        after_end = self._index(e[timed], n) + 1
        a = np.bincount(after_start, rate, n + 1) - np.bincount(after_end, rate, n + 1)
        b = np.bincount(after_start, rate * s[timed], n + 1) - np.bincount(after_end, rate * e[timed], n + 1)
        done = np.arange(n + 1) * self.width * np.cumsum(a) - np.cumsum(b)
        self.spread[lo - self.first : hi - self.first + 1] += np.diff(done)
        # A call of no measurable duration finishes all its images in its end bin.
        np.add.at(self.spread, self._index(e[~timed], n) + (lo - self.first), images[~timed])

    def merge(self, other: CallTimeline) -> None:
        """Add another timeline's calls (one built from other parts, by a task elsewhere): both
        brought to the wider one's bins, which start at the same origin and only double."""
        if not len(other.finished):
            return
        other = copy.deepcopy(other)
        while True:
            while self.width < other.width:
                self._coarsen()
            while other.width < self.width:
                other._coarsen()
            width = self.width
            self._cover(other.first * width, (other.first + len(other.finished) - 1) * width)
            if self.width == width:
                break
        at = other.first - self.first
        self.finished[at : at + len(other.finished)] += other.finished
        self.spread[at : at + len(other.spread)] += other.spread
        self.start, self.end = min(self.start, other.start), max(self.end, other.end)
        self.images += other.images

    def _index(self, local: np.ndarray, n: int) -> np.ndarray:
        return np.clip(np.floor(local / self.width).astype(np.int64), 0, n - 1)

    def _cover(self, start: float, end: float) -> tuple[int, int]:
        """Grow (and coarsen) the bins to hold [start, end]; returns its first and last bin."""
        while True:
            lo, hi = math.floor(start / self.width), math.floor(end / self.width)
            if len(self.finished):
                lo, hi = min(lo, self.first), max(hi, self.first + len(self.finished) - 1)
            if hi - lo + 1 <= self.MAX_BINS:
                break
            self._coarsen()
        if not len(self.finished):
            self.first = lo
        left, right = self.first - lo, hi - (self.first + len(self.finished) - 1)
        if left > 0 or right > 0:
            pad = (max(left, 0), max(right, 0))
            self.finished, self.spread = np.pad(self.finished, pad), np.pad(self.spread, pad)
            self.first = lo
        return math.floor(start / self.width), math.floor(end / self.width)

    def _coarsen(self) -> None:
        """Merge bins in pairs (2i, 2i + 1) into bin i of twice the width."""
        if self.first % 2:
            self.finished, self.spread = np.pad(self.finished, (1, 0)), np.pad(self.spread, (1, 0))
            self.first -= 1
        if len(self.finished) % 2:
            self.finished, self.spread = np.pad(self.finished, (0, 1)), np.pad(self.spread, (0, 1))
        self.finished = self.finished.reshape(-1, 2).sum(axis=1)
        self.spread = self.spread.reshape(-1, 2).sum(axis=1)
        self.first //= 2
        self.width *= 2


@dataclass
class PartsDigest:
    """The part records added up, one at a time: everything the report shows of them."""

    stats: JobStats = field(default_factory=JobStats)
    timeline: CallTimeline = field(default_factory=CallTimeline)

    @classmethod
    def of(cls, records: Iterable[PartStats]) -> PartsDigest:
        digest = cls()
        for record in records:
            digest.add(record)
        return digest

    def add(self, record: PartStats) -> None:
        self.timeline.add(np.asarray(record.calls, dtype=np.float64).reshape(-1, 3))
        self.stats.add_part(record)

    def merge(self, other: PartsDigest) -> None:
        """Add the records another digest added up (a report task's group of parts)."""
        self.timeline.merge(other.timeline)
        self.stats.merge(other.stats)

    @property
    def parts(self) -> int:
        return self.stats.parts

    @property
    def total(self) -> PartStats:
        """The records' sum, without their model calls."""
        return self.stats.totals


@dataclass(frozen=True)
class ThroughputSeries:
    """Images finished over time (seconds since the first model call started)."""

    finished_at: np.ndarray  # when images finished (a time bin's end), increasing
    cumulative: np.ndarray  # images finished by then
    bin_edges: np.ndarray
    images_per_second: np.ndarray  # one value per bin

    @property
    def span(self) -> float:
        return float(self.bin_edges[-1] - self.bin_edges[0]) if len(self.bin_edges) else 0.0


def throughput_series(digest: PartsDigest, *, max_bins: int = 80) -> ThroughputSeries | None:
    """Cumulative images finished, and images/s in up to `max_bins` bins of about a model call
    or more (a call's images spread over its duration, so bins shorter than a call show the rate,
    not batch-end spikes)."""
    timeline = digest.timeline
    if not timeline.images:
        return None
    t0, span = timeline.start, max(timeline.end - timeline.start, 1e-6)
    typical = digest.stats.batch_latency_seconds().get("p50") or span
    bins = int(min(max_bins, max(10, round(span / typical))))
    edges = np.linspace(0.0, span, bins + 1)
    width = timeline.width
    held = (timeline.first + np.arange(len(timeline.spread) + 1)) * width - t0  # bin edges, since t0
    done = np.interp(edges, held, np.concatenate([[0.0], np.cumsum(timeline.spread)]))
    ended = np.flatnonzero(timeline.finished)
    return ThroughputSeries(
        finished_at=np.minimum(held[ended + 1], span),
        cumulative=np.cumsum(timeline.finished[ended]),
        bin_edges=edges,
        images_per_second=np.diff(done) / np.diff(edges),
    )


def actor_summaries(total: PartStats) -> list[tuple[str, WorkerStats]]:
    """Each generator actor over every part (from its first call's start to its last call's end),
    by node, then actor."""
    return sorted(total.workers.items(), key=lambda item: (item[1].node, item[0]))


def stage_breakdown(total: PartStats) -> list[tuple[str, float]]:
    """Busy seconds per stage, summed over every part and actor (`total`), in pipeline order."""
    phases = dict(total.stage_seconds)
    stages = [(PHASES[p], phases.pop(p)) for p in PHASES if p in phases]
    stages += [(p.replace("_", " ").capitalize(), s) for p, s in sorted(phases.items())]
    other = total.generation_seconds - sum(s for _, s in stages)
    if other > 0.01 * max(total.generation_seconds, 1e-9):  # time in the generator outside the timed phases
        stages.append(("Other generation", other))
    stages.append(("Image encoding", total.encode_seconds))
    stages.append(("Upload", total.upload_seconds))
    return stages


def summarise_parts(digest: PartsDigest, job: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of `stats.json` rebuilt from the part records, for an output without one
    (a run that was interrupted): wall time runs from the first model call to the last commit."""
    config = (job or {}).get("config") or {}
    extra = {
        "manifest_rows": (job or {}).get("manifest_rows"),
        "batch_size": (config.get("generation") or {}).get("batch_size"),
        "actors": (config.get("resources") or {}).get("actors"),
        "layout": (config.get("write") or {}).get("layout"),
    }
    stats, timeline = digest.stats, digest.timeline
    if not stats.model_calls:  # no model call recorded: no time, nothing per second
        summary = stats.to_dict(wall_seconds=0.0, manifest_rows=0, extra=extra)
        return {key: value for key, value in summary.items() if key not in UNTIMED}
    committed = digest.total.committed_at
    end = timeline.end if committed is None else max(committed, timeline.end)
    return stats.to_dict(wall_seconds=end - timeline.start, manifest_rows=0, extra=extra)

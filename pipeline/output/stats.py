"""Job statistics: one typed record, merged in one place.

A `PartStats` is what a unit of work measured. The generator stage makes one per batch (where it
ran, its model calls, seconds per phase, GPU utilisation and memory) and sends it with the batch
as JSON; the writer adds up a part's batch records with what the part's metadata says (rows,
bytes, seconds per stage) and writes the sum next to the part's outputs
(`stats/part-<digest>.json`), before the metadata that commits it. The driver adds up the parts
as they commit (`JobStats`) into `stats.json`, `tune` and `estimate` read the driver's totals, and
`sdxl-batch report` adds up the records of every run. Every one of these sums is
`PartStats.__add__` (with `WorkerStats.__add__` per generator actor), so a batch, a part and a
job merge by the same rules, as datatrove's `Stats` do.

`from_dict` reads the records of older versions: a key they lack is a measurement of zero.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ddsketch import DDSketch

from pipeline.core import words

PERCENTILES = (50, 90, 99)

Call = tuple[int, float, float]  # one model call: images, seconds, when it ended (epoch seconds)


def job_label(output: str) -> str:
    """The `job` tag of the Ray metrics: the output prefix's last component."""
    return output.rstrip("/").rsplit("/", 1)[-1] or output


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 4) if seconds > 0 else 0.0


def _max_known(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


@dataclass
class WorkerStats:
    """One generator actor's model calls within a record (a batch, a part, a whole job)."""

    node: str = ""
    gpu: str = ""  # `gpu<ids>` as Ray assigned them; "" on CPU
    device: str = ""
    accelerator_type: str = ""  # Ray's name of the actor's GPU type (A10G, H100, ...); CPU
    rows: int = 0
    calls: int = 0
    busy_seconds: float = 0.0  # in model calls
    first_start: float = math.inf  # epoch seconds
    last_end: float = -math.inf
    # The actor's first call (warm-up: CUDA kernels, torch.compile) is left out of steady rates.
    first_end: float = math.inf
    first_rows: int = 0
    # Utilisation weighted by busy seconds, so that parts and batches merge exactly.
    utilization_seconds: float = 0.0
    utilization_sum: float = 0.0
    gpu_memory_peak_mb: float | None = None

    @classmethod
    def of_calls(
        cls,
        calls: list[Call],
        *,
        node: str,
        gpu: str,
        device: str,
        rows: int,
        utilization: float | None,
        gpu_memory_peak_mb: float | None,
        accelerator_type: str = "",
    ) -> WorkerStats:
        """An actor's figures for one batch of (at least one) model calls; `utilization` is the
        GPU's mean over the batch (None: not sampled)."""
        busy = sum(seconds for _, seconds, _ in calls)
        first = min(calls, key=lambda call: call[2])
        return cls(
            node=node,
            gpu=gpu,
            device=device,
            accelerator_type=accelerator_type,
            rows=rows,
            calls=len(calls),
            busy_seconds=busy,
            first_start=min(end - seconds for _, seconds, end in calls),
            last_end=max(end for _, _, end in calls),
            first_end=first[2],
            first_rows=first[0],
            utilization_seconds=busy if utilization is not None else 0.0,
            utilization_sum=utilization * busy if utilization is not None else 0.0,
            gpu_memory_peak_mb=gpu_memory_peak_mb,
        )

    def __iadd__(self, other: WorkerStats) -> WorkerStats:
        self.node, self.gpu, self.device = self.node or other.node, self.gpu or other.gpu, self.device or other.device
        self.accelerator_type = self.accelerator_type or other.accelerator_type
        self.rows += other.rows
        self.calls += other.calls
        self.busy_seconds += other.busy_seconds
        self.utilization_seconds += other.utilization_seconds
        self.utilization_sum += other.utilization_sum
        if other.first_end < self.first_end:
            self.first_end, self.first_rows = other.first_end, other.first_rows
        self.first_start = min(self.first_start, other.first_start)
        self.last_end = max(self.last_end, other.last_end)
        self.gpu_memory_peak_mb = _max_known(self.gpu_memory_peak_mb, other.gpu_memory_peak_mb)
        return self

    def __add__(self, other: WorkerStats) -> WorkerStats:
        result = replace(self)
        result += other
        return result

    @property
    def span_seconds(self) -> float:
        """The actor's working span: its first call's start to its last call's end."""
        return self.last_end - self.first_start

    @property
    def images_per_second(self) -> float:
        return self.rows / self.span_seconds if self.span_seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float | None:
        """Time in model calls over the working span; None for an actor without a span."""
        return min(1.0, self.busy_seconds / self.span_seconds) if self.span_seconds > 0 else None

    @property
    def steady_images_per_second(self) -> float:
        """Images/s after the first (warm-up) call: rows after it over the time from its end to
        the last call's end; an actor with a single call falls back to rows / busy seconds."""
        after = self.rows - self.first_rows
        span = self.last_end - self.first_end
        if after > 0 and span > 0:
            return after / span
        return self.rows / self.busy_seconds if self.busy_seconds > 0 else 0.0

    @property
    def gpu_utilization_percent(self) -> float | None:
        return self.utilization_sum / self.utilization_seconds if self.utilization_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStats:
        first_start = float(data.get("first_start", math.inf))
        peak = data.get("gpu_memory_peak_mb")
        return cls(
            node=str(data.get("node") or ""),
            gpu=str(data.get("gpu") or ""),
            device=str(data.get("device") or ""),
            accelerator_type=str(data.get("accelerator_type") or ""),
            rows=int(data.get("rows", 0)),
            calls=int(data.get("calls", 0)),
            busy_seconds=float(data.get("busy_seconds", 0.0)),
            first_start=first_start,
            last_end=float(data.get("last_end", -math.inf)),
            # Records written before first_end/first_rows existed: their first call counts as the start.
            first_end=float(data.get("first_end", first_start)),
            first_rows=int(data.get("first_rows", 0)),
            utilization_seconds=float(data.get("utilization_seconds") or 0.0),
            utilization_sum=float(data.get("utilization_sum") or 0.0),
            gpu_memory_peak_mb=float(peak) if peak is not None else None,
        )


@dataclass
class PartStats:
    """The measurements of a batch, a part, or any sum of them (the fields of `stats/part-*.json`)."""

    part: str = ""  # the part's name; a sum keeps the first
    rows: int = 0  # rows committed (the metadata's); a generator batch leaves it to the writer
    bytes: int = 0
    generation_seconds: float = 0.0
    encode_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    prompts_truncated: int = 0
    negative_prompts_truncated: int = 0
    min_render_batch_size: int = 0  # the smallest model call (out-of-memory splits); 0: none recorded
    actors: Counter[str] = field(default_factory=Counter)  # rows per actor
    nodes: Counter[str] = field(default_factory=Counter)  # rows per node
    oom_retries: int = 0
    lora_layers_unmatched: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # the generator's phases
    calls: list[Call] = field(default_factory=list)
    workers: dict[str, WorkerStats] = field(default_factory=dict)  # per generator actor
    committed_at: float | None = None  # epoch seconds; a sum keeps the latest
    upload_seconds: float = 0.0

    @classmethod
    def of_batch(
        cls,
        *,
        actor: str,
        node: str,
        gpu: str,
        device: str,
        rows: int,
        calls: list[Call],
        oom_retries: int = 0,
        stage_seconds: dict[str, float] | None = None,
        utilization: float | None = None,
        gpu_memory_peak_mb: float | None = None,
        lora_layers_unmatched: int = 0,
        accelerator_type: str = "",
    ) -> PartStats:
        """A generator batch's record: its model calls, and its actor's figures for them."""
        workers = {}
        if calls:  # an actor's figures (first and last call, busy seconds) need at least one call
            workers[actor] = WorkerStats.of_calls(
                calls, node=node, gpu=gpu, device=device, rows=rows, utilization=utilization,
                gpu_memory_peak_mb=gpu_memory_peak_mb, accelerator_type=accelerator_type,
            )  # fmt: skip
        return cls(
            oom_retries=oom_retries,
            lora_layers_unmatched=lora_layers_unmatched,
            stage_seconds=dict(stage_seconds or {}),
            calls=list(calls),
            workers=workers,
        )

    def __iadd__(self, other: PartStats) -> PartStats:
        self.part = self.part or other.part
        self.rows += other.rows
        self.bytes += other.bytes
        self.generation_seconds += other.generation_seconds
        self.encode_seconds += other.encode_seconds
        self.peak_memory_mb = max(self.peak_memory_mb, other.peak_memory_mb)
        self.prompts_truncated += other.prompts_truncated
        self.negative_prompts_truncated += other.negative_prompts_truncated
        smallest = [n for n in (self.min_render_batch_size, other.min_render_batch_size) if n]
        self.min_render_batch_size = min(smallest, default=0)
        self.actors.update(other.actors)
        self.nodes.update(other.nodes)
        self.oom_retries += other.oom_retries
        # A property of the loaded model, the same in every batch of every actor: the largest, not a sum.
        self.lora_layers_unmatched = max(self.lora_layers_unmatched, other.lora_layers_unmatched)
        for stage, seconds in other.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.calls.extend(other.calls)
        for actor, worker in other.workers.items():
            if actor in self.workers:
                self.workers[actor] += worker
            else:
                self.workers[actor] = replace(worker)
        self.committed_at = _max_known(self.committed_at, other.committed_at)
        self.upload_seconds += other.upload_seconds
        return self

    def __add__(self, other: PartStats) -> PartStats:
        result = PartStats()
        result += self
        result += other
        return result

    @classmethod
    def total(cls, records: Iterable[PartStats]) -> PartStats:
        """The records added up in place (`sum()` would copy the growing total at every step)."""
        total = cls()
        for record in records:
            total += record
        return total

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: the fields, in order."""
        record = asdict(self)
        record["actors"], record["nodes"] = dict(self.actors), dict(self.nodes)
        record["calls"] = [list(call) for call in self.calls]
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartStats:
        committed = data.get("committed_at")
        return cls(
            part=str(data.get("part") or ""),
            rows=int(data.get("rows", 0)),
            bytes=int(data.get("bytes", 0)),
            generation_seconds=float(data.get("generation_seconds", 0.0)),
            encode_seconds=float(data.get("encode_seconds", 0.0)),
            peak_memory_mb=float(data.get("peak_memory_mb", 0.0)),
            prompts_truncated=int(data.get("prompts_truncated", 0)),
            negative_prompts_truncated=int(data.get("negative_prompts_truncated", 0)),
            min_render_batch_size=int(data.get("min_render_batch_size", 0)),
            actors=Counter({str(k): int(v) for k, v in (data.get("actors") or {}).items()}),
            nodes=Counter({str(k): int(v) for k, v in (data.get("nodes") or {}).items()}),
            oom_retries=int(data.get("oom_retries", 0)),
            lora_layers_unmatched=int(data.get("lora_layers_unmatched", 0)),
            stage_seconds={str(k): float(v) for k, v in (data.get("stage_seconds") or {}).items()},
            calls=[(int(c[0]), float(c[1]), float(c[2])) for c in data.get("calls") or [] if len(c) >= 3],
            workers={str(a): WorkerStats.from_dict(w) for a, w in (data.get("workers") or {}).items()},
            committed_at=float(committed) if committed is not None else None,
            upload_seconds=float(data.get("upload_seconds", 0.0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PartStats:
        return cls.from_dict(json.loads(text))


def merge_telemetry(records: Iterable[str | None]) -> PartStats:
    """One part's generator batch records (JSON, on the first row of each batch; None elsewhere)."""
    return PartStats.total(PartStats.from_json(record) for record in records if record)


def group_workers(workers: dict[str, WorkerStats], key: str) -> dict[str, dict[str, Any]]:
    """Workers summed by node, GPU or accelerator type: rows, actors, and images/s over the
    group's working span (first call start to last call end of any of its actors)."""
    groups: dict[str, list[WorkerStats]] = {}
    for worker in workers.values():
        if key == "gpu" and not worker.gpu:
            continue
        if key == "type":
            label = worker.accelerator_type or "unknown"
        else:
            label = worker.node if key == "node" else f"{worker.node[:12]}/{worker.gpu}"
        groups.setdefault(label, []).append(worker)
    summary = {}
    for label, members in sorted(groups.items()):
        rows = sum(w.rows for w in members)
        span = max(w.last_end for w in members) - min(w.first_start for w in members)
        summary[label] = {
            "rows": rows,
            "actors": len(members),
            "images_per_second": _rate(rows, span),
            "busy_seconds": round(sum(w.busy_seconds for w in members), 3),
        }
    return summary


# Latency percentiles are read from a DDSketch (Datadog's mergeable quantile sketch): within this
# relative error of the exact value, in memory that grows with the log of the latencies' range, not
# with the number of calls (a 100M-row job makes some 12M model calls: 400 MB as a list of floats).
LATENCY_ACCURACY = 0.005


def latency_sketch() -> DDSketch:
    return DDSketch(relative_accuracy=LATENCY_ACCURACY)


@dataclass
class JobStats:
    """Running totals the driver updates as parts commit: the part records added up, except for
    their model calls, of which only the seconds are kept, in a quantile sketch (the latency
    percentiles): memory that does not grow with the job (`part_records` benchmark).

    The figures are those of `stats.json`, rounded as there; `tune` and `estimate` read them here.
    """

    totals: PartStats = field(default_factory=PartStats)
    parts: int = 0
    latency: DDSketch = field(default_factory=latency_sketch)

    @classmethod
    def of_parts(cls, records: Iterable[PartStats]) -> JobStats:
        stats = cls()
        for record in records:
            stats.add_part(record)
        return stats

    def add_part(self, record: PartStats) -> None:
        """Add one part's stats record (as the writer wrote it to stats/)."""
        self.parts += 1
        for _, seconds, _ in record.calls:
            self.latency.add(max(seconds, 0.0))
        self.totals += replace(record, calls=[])

    def merge(self, other: JobStats) -> None:
        """Add the parts another JobStats added up."""
        self.parts += other.parts
        self.latency.merge(other.latency)
        self.totals += other.totals

    @property
    def model_calls(self) -> int:
        return int(self.latency.count)

    @property
    def workers(self) -> dict[str, WorkerStats]:
        return self.totals.workers

    def batch_latency_seconds(self) -> dict[str, float]:
        """Latency of a model call (a batch of rows with equal settings), p50/p90/p99, each within
        LATENCY_ACCURACY of the exact percentile."""
        if not self.model_calls:
            return {}
        return {f"p{p}": round(float(self.latency.get_quantile_value(p / 100) or 0.0), 4) for p in PERCENTILES}

    def generation_span(self) -> float:
        """Seconds from the first model call's start to the last one's end, over all actors."""
        if not self.workers:
            return 0.0
        end = max(w.last_end for w in self.workers.values())
        return end - min(w.first_start for w in self.workers.values())

    def generation_span_seconds(self) -> float:
        return round(self.generation_span(), 3)

    def generation_images_per_second(self) -> float:
        return _rate(self.totals.rows, self.generation_span())

    def steady_images_per_second(self) -> float:
        """Sum over actors of their rate after warm-up: what `tune` and `estimate` compare."""
        return round(sum(w.steady_images_per_second for w in self.workers.values()), 4)

    def busy_fraction(self) -> float | None:
        busy = sum(w.busy_seconds for w in self.workers.values())
        spans = sum(w.span_seconds for w in self.workers.values())
        return round(min(1.0, busy / spans), 4) if spans > 0 else None

    def peak_memory_mb(self) -> float:
        return round(self.totals.peak_memory_mb, 1)

    def peak_gpu_memory_mb(self) -> float | None:
        peak = _max_known(*(w.gpu_memory_peak_mb for w in self.workers.values()))
        return round(peak, 1) if peak is not None else None

    def gpu_utilization_percent(self) -> float | None:
        utilized = sum(w.utilization_seconds for w in self.workers.values())
        return round(sum(w.utilization_sum for w in self.workers.values()) / utilized, 1) if utilized else None

    def per_actor(self) -> dict[str, dict[str, Any]]:
        actors = {}
        for actor, w in sorted(self.workers.items()):
            utilization = w.gpu_utilization_percent
            actors[actor] = {
                "node": w.node,
                "gpu": w.gpu,
                "accelerator_type": w.accelerator_type,
                "rows": w.rows,
                "model_calls": w.calls,
                "busy_seconds": round(w.busy_seconds, 3),
                "images_per_second": _rate(w.rows, w.span_seconds),
                "steady_images_per_second": round(w.steady_images_per_second, 4),
                "busy_fraction": round(w.busy_fraction, 4) if w.busy_fraction is not None else 1.0,
                "gpu_utilization_percent": round(utilization, 1) if utilization is not None else None,
                "gpu_memory_peak_mb": w.gpu_memory_peak_mb,
            }
        return actors

    def to_dict(self, *, wall_seconds: float, manifest_rows: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The `stats.json` record (fields documented in docs/throughput.md). Stage seconds are summed
        over workers (busy time, not wall time)."""
        t = self.totals
        return {
            "rows": t.rows,
            "manifest_rows": manifest_rows,
            "parts": self.parts,
            "bytes": t.bytes,
            "wall_seconds": round(wall_seconds, 3),
            "images_per_second": _rate(t.rows, wall_seconds),
            "generation_span_seconds": self.generation_span_seconds(),
            "generation_images_per_second": self.generation_images_per_second(),
            "steady_images_per_second": self.steady_images_per_second(),
            "stage_seconds": {
                "generate": round(t.generation_seconds, 3),
                **{f"generate.{k}": round(v, 3) for k, v in sorted(t.stage_seconds.items())},
                "encode": round(t.encode_seconds, 3),
                "upload": round(t.upload_seconds, 3),
            },
            "model_calls": self.model_calls,
            "batch_latency_seconds": self.batch_latency_seconds(),
            "seconds_per_image": round(t.generation_seconds / t.rows, 4) if t.rows else 0.0,
            "busy_fraction": self.busy_fraction(),
            "peak_memory_mb": self.peak_memory_mb(),
            "peak_gpu_memory_mb": self.peak_gpu_memory_mb(),
            "gpu_utilization_percent": self.gpu_utilization_percent(),
            "oom_retries": t.oom_retries,
            "min_render_batch_size": t.min_render_batch_size,
            "prompts_truncated": t.prompts_truncated,
            "negative_prompts_truncated": t.negative_prompts_truncated,
            "lora_layers_unmatched": t.lora_layers_unmatched,
            "rows_per_actor": dict(t.actors),
            "rows_per_node": dict(t.nodes),
            "per_actor": self.per_actor(),
            "per_node": group_workers(self.workers, "node"),
            "per_gpu": group_workers(self.workers, "gpu"),
            "per_accelerator_type": group_workers(self.workers, "type"),
            **extra,
        }


BREAKDOWN_NAMES = {
    "planning": "checks and planning",
    "starting_ray": "starting Ray",
    "starting_generators": "starting the generators (model load, first call)",
    "rendering": "rendering",
    "finishing": "finishing",
}


def wall_breakdown_text(record: dict[str, Any]) -> str:
    """`stats.json`'s wall time by phase, as one line: where a run's time went before its first
    image, while rendering, and after its last commit."""
    phases = record.get("wall_breakdown_seconds") or {}
    startup = sum(phases.get(k, 0.0) for k in ("planning", "starting_ray", "starting_generators"))
    parts = ", ".join(
        f"{BREAKDOWN_NAMES[k]} {phases[k]:.1f} s" for k in ("planning", "starting_ray", "starting_generators")
        if phases.get(k)
    )  # fmt: skip
    return (
        f"start-up {startup:.1f} s ({parts}), rendering {phases.get('rendering', 0.0):.1f} s, "
        f"finishing {phases.get('finishing', 0.0):.1f} s"
    )


def summary_lines(record: dict[str, Any]) -> list[str]:
    """A run's summary on the console, in `stats.json`'s definitions (docs/throughput.md):
    wall images/s (rows over the whole run), rendering images/s (first image to last commit),
    generating images/s (the generators' first call to their last) and the steady rate after
    warm-up, per GPU where there are GPUs."""
    rows, wall = record["rows"], record["wall_seconds"]
    lines = [f"Rendered {words.count(rows, 'image')} in {wall:.1f} s: {record['images_per_second']:.2f} images/s wall"]
    if record.get("wall_breakdown_seconds"):
        lines.append(f"  {wall_breakdown_text(record)}")
    rates = [f"{record.get('rendering_images_per_second', 0.0):.2f} images/s rendering"]
    rates.append(f"{record.get('generation_images_per_second', 0.0):.2f} generating")
    steady = record.get("steady_images_per_second") or 0.0
    gpus = len(record.get("per_gpu") or {})
    if steady:
        rates.append(f"{steady:.2f} steady" + (f" ({steady / gpus:.2f} per GPU)" if gpus else ""))
    lines.append("  " + ", ".join(rates))
    return lines

"""Job statistics.

Each committed part has a stats record (`stats/part-<digest>.json`, written by the writer next
to its outputs): its rows, bytes, seconds per stage, its model calls (images, seconds, end time),
and per generator actor the rows, busy seconds, first/last call, GPU utilisation and memory. The
driver merges the records into `stats.json` as parts commit; `sdxl-batch report` reads both.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


def job_label(output: str) -> str:
    """The `job` tag of the Ray metrics: the output prefix's last component."""
    return output.rstrip("/").rsplit("/", 1)[-1] or output


def merge_telemetry(records: list[str | None]) -> dict[str, Any]:
    """Merge the generator's per-batch measurements (JSON, one per batch) of one part."""
    merged: dict[str, Any] = {
        "oom_retries": 0,
        "lora_layers_unmatched": 0,
        "stage_seconds": {},
        "calls": [],
        "workers": {},
    }
    for record in records:
        if not record:
            continue
        data = json.loads(record)
        merged["oom_retries"] += int(data.get("oom_retries", 0))
        # A property of the loaded model, the same in every batch of every actor: the largest, not a sum.
        merged["lora_layers_unmatched"] = max(
            merged["lora_layers_unmatched"], int(data.get("lora_layers_unmatched", 0))
        )
        for stage, seconds in data.get("stage_seconds", {}).items():
            merged["stage_seconds"][stage] = merged["stage_seconds"].get(stage, 0.0) + float(seconds)
        calls = data.get("calls", [])
        merged["calls"].extend(calls)
        if calls and "actor" in data:
            _merge_worker(merged["workers"], data["actor"], _worker_of_batch(data, calls))
    return merged


def _worker_of_batch(data: dict[str, Any], calls: list[list[float]]) -> dict[str, Any]:
    busy = sum(float(c[1]) for c in calls)
    utilization = data.get("gpu_utilization")
    first = min(calls, key=lambda c: float(c[2]))
    return {
        "node": data.get("node", ""),
        "gpu": data.get("gpu", ""),
        "device": data.get("device", ""),
        "rows": int(data.get("rows", sum(int(c[0]) for c in calls))),
        "calls": len(calls),
        "busy_seconds": busy,
        "first_start": min(float(c[2]) - float(c[1]) for c in calls),
        "last_end": max(float(c[2]) for c in calls),
        # The actor's first call (warm-up: CUDA kernels, torch.compile) is left out of steady rates.
        "first_end": float(first[2]),
        "first_rows": int(first[0]),
        # Utilisation weighted by busy seconds, so that parts and batches merge exactly.
        "utilization_seconds": busy if utilization is not None else 0.0,
        "utilization_sum": float(utilization) * busy if utilization is not None else 0.0,
        "gpu_memory_peak_mb": data.get("gpu_memory_peak_mb"),
    }


def _merge_worker(workers: dict[str, dict[str, Any]], actor: str, update: dict[str, Any]) -> None:
    current = workers.get(actor)
    if current is None:
        workers[actor] = dict(update)
        return
    for key in ("rows", "calls", "busy_seconds", "utilization_seconds", "utilization_sum"):
        current[key] += update[key]
    # Records written before first_end/first_rows existed: their first call counts as the start.
    update_first = update.get("first_end", update["first_start"])
    if update_first < current.get("first_end", current["first_start"]):
        current["first_end"], current["first_rows"] = update_first, update.get("first_rows", 0)
    current["first_start"] = min(current["first_start"], update["first_start"])
    current["last_end"] = max(current["last_end"], update["last_end"])
    peaks = [p for p in (current["gpu_memory_peak_mb"], update["gpu_memory_peak_mb"]) if p is not None]
    current["gpu_memory_peak_mb"] = max(peaks) if peaks else None


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 4) if seconds > 0 else 0.0


def steady_rate(worker: dict[str, Any]) -> float:
    """An actor's images/s after its first (warm-up) call: rows after it over the time from its
    end to the last call's end; an actor with a single call falls back to rows / busy seconds."""
    after = int(worker["rows"]) - int(worker.get("first_rows", 0))
    span = float(worker["last_end"] - worker.get("first_end", worker["first_start"]))
    if after > 0 and span > 0:
        return after / span
    busy = float(worker["busy_seconds"])
    return int(worker["rows"]) / busy if busy > 0 else 0.0


def group_workers(workers: dict[str, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Workers summed by node or GPU: rows, actors, and images/s over the group's working span
    (first call start to last call end of any of its actors)."""
    groups: dict[str, dict[str, Any]] = {}
    for worker in workers.values():
        label = worker["node"] if key == "node" else f"{worker['node'][:12]}/{worker['gpu']}"
        if key == "gpu" and not worker["gpu"]:
            continue
        group = groups.setdefault(label, {"rows": 0, "actors": 0, "busy_seconds": 0.0, "start": None, "end": None})
        group["rows"] += worker["rows"]
        group["actors"] += 1
        group["busy_seconds"] += worker["busy_seconds"]
        group["start"] = min(filter(None, (group["start"], worker["first_start"])))
        group["end"] = max(filter(None, (group["end"], worker["last_end"])))
    return {
        label: {
            "rows": g["rows"],
            "actors": g["actors"],
            "images_per_second": _rate(g["rows"], g["end"] - g["start"]),
            "busy_seconds": round(g["busy_seconds"], 3),
        }
        for label, g in sorted(groups.items())
    }


@dataclass
class JobStats:
    """Running totals the driver updates as parts commit."""

    rows: int = 0
    parts: int = 0
    bytes: int = 0
    generation_seconds: float = 0.0
    encode_seconds: float = 0.0
    upload_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    oom_retries: int = 0
    prompts_truncated: int = 0
    negative_prompts_truncated: int = 0
    min_render_batch_size: int = 0
    lora_layers_unmatched: int = 0
    per_actor: Counter[str] = field(default_factory=Counter)
    per_node: Counter[str] = field(default_factory=Counter)
    phase_seconds: Counter[str] = field(default_factory=Counter)
    call_seconds: list[float] = field(default_factory=list)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_part(self, record: dict[str, Any]) -> None:
        """Add one part's stats record (as the writer wrote it to stats/)."""
        self.rows += int(record["rows"])
        self.parts += 1
        self.bytes += int(record["bytes"])
        self.generation_seconds += float(record["generation_seconds"])
        self.encode_seconds += float(record["encode_seconds"])
        self.upload_seconds += float(record.get("upload_seconds", 0.0))
        self.peak_memory_mb = max(self.peak_memory_mb, float(record["peak_memory_mb"]))
        self.oom_retries += int(record.get("oom_retries", 0))
        self.phase_seconds.update(record.get("stage_seconds") or {})
        self.call_seconds.extend(float(call[1]) for call in record.get("calls") or [])
        self.prompts_truncated += int(record.get("prompts_truncated", 0))
        self.negative_prompts_truncated += int(record.get("negative_prompts_truncated", 0))
        self.lora_layers_unmatched = max(self.lora_layers_unmatched, int(record.get("lora_layers_unmatched", 0)))
        smallest = int(record.get("min_render_batch_size", 0))
        if smallest:
            self.min_render_batch_size = min(self.min_render_batch_size or smallest, smallest)
        self.per_actor.update(record.get("actors") or {})
        self.per_node.update(record.get("nodes") or {})
        for actor, worker in (record.get("workers") or {}).items():
            _merge_worker(self.workers, actor, worker)

    def _percentiles(self) -> dict[str, float]:
        """Latency of a model call (a batch of rows with equal settings), p50/p90/p99."""
        if not self.call_seconds:
            return {}
        import numpy as np

        values = np.percentile(np.asarray(self.call_seconds), PERCENTILES)
        return {f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, values, strict=True)}

    def _actors(self) -> dict[str, dict[str, Any]]:
        actors = {}
        for actor, w in sorted(self.workers.items()):
            span = w["last_end"] - w["first_start"]
            actors[actor] = {
                "node": w["node"],
                "gpu": w["gpu"],
                "rows": w["rows"],
                "model_calls": w["calls"],
                "busy_seconds": round(w["busy_seconds"], 3),
                "images_per_second": _rate(w["rows"], span),
                "steady_images_per_second": round(steady_rate(w), 4),
                "busy_fraction": round(min(1.0, w["busy_seconds"] / span), 4) if span > 0 else 1.0,
                "gpu_utilization_percent": (
                    round(w["utilization_sum"] / w["utilization_seconds"], 1) if w["utilization_seconds"] else None
                ),
                "gpu_memory_peak_mb": w["gpu_memory_peak_mb"],
            }
        return actors

    def generation_span(self) -> float:
        """Seconds from the first model call's start to the last one's end, over all actors."""
        if not self.workers:
            return 0.0
        end = max(float(w["last_end"]) for w in self.workers.values())
        return end - min(float(w["first_start"]) for w in self.workers.values())

    def to_dict(self, *, wall_seconds: float, manifest_rows: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The `stats.json` record (fields documented in the README). Stage seconds are summed
        over workers (busy time, not wall time)."""
        actors = self._actors()
        span = self.generation_span()
        busy = sum(w["busy_seconds"] for w in self.workers.values())
        spans = sum(w["last_end"] - w["first_start"] for w in self.workers.values())
        utilized = sum(w["utilization_seconds"] for w in self.workers.values())
        gpu_peaks = [w["gpu_memory_peak_mb"] for w in self.workers.values() if w["gpu_memory_peak_mb"] is not None]
        return {
            "rows": self.rows,
            "manifest_rows": manifest_rows,
            "parts": self.parts,
            "bytes": self.bytes,
            "wall_seconds": round(wall_seconds, 3),
            "images_per_second": _rate(self.rows, wall_seconds),
            "generation_span_seconds": round(span, 3),
            "generation_images_per_second": _rate(self.rows, span),
            # Sum over actors of their rate after warm-up: what `tune` and `estimate` compare.
            "steady_images_per_second": round(sum(steady_rate(w) for w in self.workers.values()), 4),
            "stage_seconds": {
                "generate": round(self.generation_seconds, 3),
                **{f"generate.{k}": round(v, 3) for k, v in sorted(self.phase_seconds.items())},
                "encode": round(self.encode_seconds, 3),
                "upload": round(self.upload_seconds, 3),
            },
            "model_calls": len(self.call_seconds),
            "batch_latency_seconds": self._percentiles(),
            "seconds_per_image": round(self.generation_seconds / self.rows, 4) if self.rows else 0.0,
            "busy_fraction": round(min(1.0, busy / spans), 4) if spans > 0 else None,
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "peak_gpu_memory_mb": round(max(gpu_peaks), 1) if gpu_peaks else None,
            "gpu_utilization_percent": (
                round(sum(w["utilization_sum"] for w in self.workers.values()) / utilized, 1) if utilized else None
            ),
            "oom_retries": self.oom_retries,
            "min_render_batch_size": self.min_render_batch_size,
            "prompts_truncated": self.prompts_truncated,
            "negative_prompts_truncated": self.negative_prompts_truncated,
            "lora_layers_unmatched": self.lora_layers_unmatched,
            "rows_per_actor": dict(self.per_actor),
            "rows_per_node": dict(self.per_node),
            "per_actor": actors,
            "per_node": group_workers(self.workers, "node"),
            "per_gpu": group_workers(self.workers, "gpu"),
            **extra,
        }

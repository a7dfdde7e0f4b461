"""Job statistics: merged from the writer's per-part summaries into `stats.json`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobStats:
    """Running totals the driver updates as parts commit."""

    rows: int = 0
    parts: int = 0
    bytes: int = 0
    generation_seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    oom_retries: int = 0
    prompts_truncated: int = 0
    negative_prompts_truncated: int = 0
    min_render_batch_size: int = 0
    per_actor: Counter[str] = field(default_factory=Counter)
    per_node: Counter[str] = field(default_factory=Counter)
    phase_seconds: Counter[str] = field(default_factory=Counter)
    call_seconds: list[float] = field(default_factory=list)

    def add_part(self, summary: dict[str, Any]) -> None:
        self.rows += int(summary["rows"])
        self.parts += 1
        self.bytes += int(summary["bytes"])
        self.generation_seconds += float(summary["generation_seconds"])
        self.encode_seconds += float(summary["encode_seconds"])
        self.write_seconds += float(summary["write_seconds"])
        self.peak_memory_mb = max(self.peak_memory_mb, float(summary["peak_memory_mb"]))
        self.oom_retries += int(summary.get("oom_retries", 0))
        self.phase_seconds.update(json.loads(summary.get("stage_seconds") or "{}"))
        self.call_seconds.extend(float(seconds) for _, seconds in json.loads(summary.get("calls") or "[]"))
        self.prompts_truncated += int(summary.get("prompts_truncated", 0))
        self.negative_prompts_truncated += int(summary.get("negative_prompts_truncated", 0))
        smallest = int(summary.get("min_render_batch_size", 0))
        if smallest:
            self.min_render_batch_size = min(self.min_render_batch_size or smallest, smallest)
        self.per_actor.update(json.loads(summary["actors"]))
        self.per_node.update(json.loads(summary["nodes"]))

    def _percentiles(self) -> dict[str, float]:
        """Latency of a model call (a batch of rows with equal settings), p50/p90/p99."""
        if not self.call_seconds:
            return {}
        import numpy as np

        values = np.percentile(np.asarray(self.call_seconds), [50, 90, 99])
        return {name: round(float(v), 4) for name, v in zip(("p50", "p90", "p99"), values, strict=True)}

    def to_dict(self, *, wall_seconds: float, manifest_rows: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The `stats.json` record. Stage seconds are summed over workers (busy time, not wall time)."""
        return {
            "rows": self.rows,
            "manifest_rows": manifest_rows,
            "parts": self.parts,
            "bytes": self.bytes,
            "wall_seconds": round(wall_seconds, 3),
            "images_per_second": round(self.rows / wall_seconds, 4) if wall_seconds > 0 else 0.0,
            "stage_seconds": {
                "generate": round(self.generation_seconds, 3),
                **{f"generate.{k}": round(v, 3) for k, v in sorted(self.phase_seconds.items())},
                "encode": round(self.encode_seconds, 3),
                "write": round(self.write_seconds, 3),
            },
            "model_calls": len(self.call_seconds),
            "batch_latency_seconds": self._percentiles(),
            "seconds_per_image": round(self.generation_seconds / self.rows, 4) if self.rows else 0.0,
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "oom_retries": self.oom_retries,
            "min_render_batch_size": self.min_render_batch_size,
            "prompts_truncated": self.prompts_truncated,
            "negative_prompts_truncated": self.negative_prompts_truncated,
            "rows_per_actor": dict(self.per_actor),
            "rows_per_node": dict(self.per_node),
            **extra,
        }

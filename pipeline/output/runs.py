"""Every run's figures, and the whole output's from them (`stats.json`'s `output` section).

An output grows over many runs (a resumed job, a schedule rendering what is new each night), and
each run writes `stats.json` at its end. Each run that rendered also keeps its own record under
`stats/runs/` (`<finished at>-<id>.json`, the same fields as `stats.json`), and `stats.json`
carries, beside the last run's figures, the output's: images, GPU-seconds and wall time summed
over the runs that rendered, and a line per run. A run that renders nothing (every row was done)
writes no run record and leaves `stats.json` as it was: its 0 images/s describe no output.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from pipeline.core.io import STORAGE_ERRORS, join, read_bytes
from pipeline.core.layout import RUNS_DIR, write_json
from pipeline.output.streaming import bounded_map

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

_READ_ERRORS: tuple[type[Exception], ...] = (*STORAGE_ERRORS, ValueError)
# What `stats.json` lists of each run.
RUN_FIELDS = ("started_at", "finished_at", "rows", "rows_done_before", "wall_seconds", "images_per_second",
              "generation_images_per_second", "dtype", "model")  # fmt: skip


def write_run(fs: AbstractFileSystem, root: str, record: dict[str, Any]) -> str:
    """Keep one run's `stats.json` record under `stats/runs/`; returns its path."""
    stamp = str(record.get("finished_at") or "").replace(":", "").replace("-", "")[:15] or "run"
    path = join(root, RUNS_DIR, f"{stamp}-{uuid.uuid4().hex[:8]}.json")
    write_json(fs, path, record)
    return path


def _read(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        record = json.loads(read_bytes(fs, path))
    except _READ_ERRORS:  # a damaged record costs its run's line, not the summary
        return None
    return record if isinstance(record, dict) else None


def output_figures(fs: AbstractFileSystem, root: str) -> dict[str, Any]:
    """The whole output's figures from every run record: O(runs) reads, in parallel."""
    folder = join(root, RUNS_DIR)
    fs.invalidate_cache(folder)
    paths = sorted(p for p in fs.find(folder) if p.endswith(".json")) if fs.exists(folder) else []
    runs = [record for record in bounded_map(lambda path: _read(fs, path), paths) if record]
    runs.sort(key=lambda record: str(record.get("started_at") or ""))
    images = sum(int(run.get("rows") or 0) for run in runs)
    wall = sum(float(run.get("wall_seconds") or 0.0) for run in runs)
    gpu = sum(float((run.get("stage_seconds") or {}).get("generate") or 0.0) for run in runs)
    return {
        "runs": len(runs),
        "images": images,
        "wall_seconds": round(wall, 3),
        "generation_seconds": round(gpu, 3),
        "images_per_second": round(images / wall, 4) if wall > 0 else 0.0,
        "by_run": [{key: run.get(key) for key in RUN_FIELDS} for run in runs],
    }

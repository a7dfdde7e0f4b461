"""Helpers shared by the tests: manifests, configs and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
# The console script the package installs next to this interpreter, exactly as users run it.
CLI = [str(Path(sys.executable).with_name("sdxl-batch"))]


def write_manifest(path: Path, rows: list[dict[str, Any]], **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **kwargs)
    return path


def prompt_rows(n: int, *, start: int = 0, with_ids: bool = True) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        row: dict[str, Any] = {"prompt": f"a photo of a red dog number {i}", "seed": 1000 + i, "note": f"n{i}"}
        if with_ids:
            row["id"] = f"row-{i:04d}"
        rows.append(row)
    return rows


def write_config(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `sdxl-batch` in a fresh process, exactly as a user would."""
    full_env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def read_metadata(output: str, filesystem: Any = None) -> pa.Table:
    return pads.dataset(f"{output.rstrip('/')}/metadata", format="parquet", filesystem=filesystem).to_table()


def plan_manifest(uri: str, *, keep_problems: bool = False, rules: Any = None, executor: Any = None) -> Any:
    """A manifest planned on its own (no output), in this process unless `executor` says otherwise."""
    from pipeline.plan.executor import LocalExecutor
    from pipeline.plan.manifest import GENERIC_RULES
    from pipeline.plan.rows import plan_rows

    return plan_rows(
        uri, None, executor=executor or LocalExecutor(), rules=rules or GENERIC_RULES, keep_problems=keep_problems
    )


def pending_mask(plan: Any) -> Any:
    """Every manifest row's pending flag, files in order (a test's view: the planner never builds it)."""
    import numpy as np

    return np.concatenate([plan.pending_mask(scan.index) for scan in plan.scans])


def pending_ids(plan: Any, rules: Any = None) -> list[str]:
    """The ids of every pending row, as the read stage reads them, in manifest order."""
    from pipeline.plan.manifest import GENERIC_RULES
    from pipeline.plan.rows import iter_pending

    return [i for table in iter_pending(plan, None, rules or GENERIC_RULES) for i in table.column("id").to_pylist()]

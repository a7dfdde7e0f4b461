"""The distributed planner on a real (embedded) Ray: the same plan as in-process, and as an oracle
that reads every row; errors raised inside a task arrive as themselves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import build_config
from pipeline.core.errors import ManifestError
from pipeline.core.layout import metadata_schema
from pipeline.plan.executor import LocalExecutor, RayExecutor
from pipeline.plan.job import plan_job
from pipeline.plan.ledger import settings_fingerprint
from pipeline.plan.schema import conform
from tests.helpers import pending_ids

pytestmark = pytest.mark.integration

FILES = 40  # more than plan.rows.FILE_GROUPS: files share finishing tasks
ROWS = 50


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield
    ray.shutdown()


def _row_id(file: int, row: int) -> str:
    return f"r{(file * ROWS + row) % 1700}"  # the last 300 rows repeat ids of the first files


def _write(root: Path) -> None:
    (root / "m").mkdir()
    for f in range(FILES):
        table = pa.table({
            "id": [_row_id(f, i) for i in range(ROWS)],
            "prompt": ["" if (f + i) % 13 == 0 else "a prompt" for i in range(ROWS)],
            "seed": list(range(ROWS)),
            "width": [None if i % 4 else 128 for i in range(ROWS)],
        })  # fmt: skip
        pq.write_table(table, root / "m" / f"f{f:02d}.parquet", row_group_size=16)
    (root / "out" / "metadata").mkdir(parents=True)
    done = pa.table({"id": [f"r{i}" for i in range(0, 1000, 3)]})
    pq.write_table(conform(done, metadata_schema(pa.schema([]))), root / "out" / "metadata" / "part-a.parquet")


def _expected() -> tuple[list[str], int, int]:
    """(pending ids in order, duplicates, done rows), row by row."""
    seen: set[str] = set()
    pending, duplicates, done = [], 0, 0
    for f in range(FILES):
        for i in range(ROWS):
            if (f + i) % 13 == 0:
                continue
            row_id = _row_id(f, i)
            if row_id in seen:
                duplicates += 1
                continue
            seen.add(row_id)
            number = int(row_id[1:])
            if number < 1000 and number % 3 == 0:
                done += 1
            else:
                pending.append(row_id)
    return pending, duplicates, done


def test_ray_tasks_plan_what_one_process_plans(tmp_path: Path, ray_local: None) -> None:
    _write(tmp_path)
    config = build_config({
        "manifest": str(tmp_path / "m"), "output": str(tmp_path / "out"), "on_bad_row": "skip",
        "model": {"preset": "tiny"},
    })  # fmt: skip
    (tmp_path / "out" / "job.json").write_text(json.dumps({"fingerprint": settings_fingerprint(config)}))
    pending, duplicates, done = _expected()
    plans = {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor())):
        job = plan_job(config, executor=executor)
        rows = job.manifest
        assert pending_ids(rows) == pending
        assert rows.problem_columns["duplicate id"] == duplicates and job.done_rows == done
        assert job.pending_rows == len(pending) == sum(count for _, count in job.render_groups())
        plans[name] = (rows.problems.to_pylist(), rows.pending_row_groups, job.render_groups(), rows.problem_count)
    assert plans["ray"] == plans["local"]
    reasons = [p["reason"] for p in plans["ray"][0] if p["column"] == "id"]
    assert len(reasons) == duplicates and all(r.startswith("duplicate id (first at file ") for r in reasons)


def test_an_error_in_a_scan_task_names_the_file(tmp_path: Path, ray_local: None) -> None:
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"prompt": ["p"], "seed": [1]}), tmp_path / "m" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["p"], "seed": ["one"]}), tmp_path / "m" / "b.parquet")
    config = build_config({"manifest": str(tmp_path / "m"), "output": str(tmp_path / "out")})
    with pytest.raises(ManifestError, match="expected integer values") as info:
        plan_job(config, executor=RayExecutor())
    assert "b.parquet" in str(info.value) and "Traceback" not in str(info.value)

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


def _verified_output(root: Path, layout: str) -> tuple[Path, Path]:
    """An output of 41 parts with one of each problem `verify` finds, and its manifest."""
    from pipeline.output.writer import ModelInfo, PartWriter
    from tests.helpers import write_manifest
    from tests.output.test_writer import _encoded_batch

    out = root / layout
    writer = PartWriter(output=str(out), layout=layout, image_format="png", model=ModelInfo("tiny", "Euler"))
    for k in range(40):
        writer.write(_encoded_batch([f"r{k:02d}-{j}" for j in range(3)]))
    writer.write(_encoded_batch(["r00-0"]))  # a duplicate
    images = sorted((out / ("images" if layout == "files" else "shards")).rglob("*.*"))
    if layout == "files":
        images[5].write_bytes(b"image-of-r??-?")  # same size, other bytes
        images[9].unlink()
    else:
        images[5].write_bytes(images[5].read_bytes()[:700])  # cut off
    parts = sorted((out / "metadata").glob("*.parquet"))
    parts[3].write_bytes(b"")  # damaged
    rows = [{"id": f"r{k:02d}-{j}", "prompt": "p", "seed": 1} for k in range(42) for j in range(3)]
    return out, write_manifest(root / f"{layout}.parquet", rows)


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_ray_tasks_verify_what_one_process_verifies(
    tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """verify as Ray tasks over groups of parts (3 groups here, ids in 18 partitions) finds exactly
    what it finds in this process, sampled or not."""
    from pipeline.output import verify
    from pipeline.output.verify import verify_output

    monkeypatch.setattr(verify, "ROWS_PER_JOIN", 7)
    monkeypatch.setattr(verify, "MIN_IDS_PER_TABLE", 1)
    out, manifest = _verified_output(tmp_path, layout)
    reports = {
        name: verify_output(str(out), manifest=str(manifest), executor=lambda _, e=executor: e)  # type: ignore[misc]
        for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor()))
    }
    local, ray_report = reports["local"].summary(), reports["ray"].summary()
    assert ray_report == local
    assert "Parquet file size is 0 bytes" in local and "duplicate id (1): r00-0" in local
    assert "manifest id missing from the output (" in local and "r41-0" in local
    assert ("image sha256 or size mismatch" in local) and (layout == "webdataset" or "image missing (1)" in local)
    sampled = verify_output(str(out), manifest=str(manifest), sample=0.01, executor=lambda _: RayExecutor())
    assert sampled.checked_images == reports["local"].checked_images and sampled.hashed_images < sampled.checked_images
    assert "a random 1.00% sample, seed" in sampled.summary()


def test_ray_tasks_read_the_report_that_one_process_reads(
    tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's footers and stats records, read by Ray tasks over groups of parts (6 groups
    here) and merged on the driver: the same samples and figures as read in this process."""
    from pipeline.core.io import filesystem
    from pipeline.output.report import read as report_read
    from pipeline.output.writer import ModelInfo, PartWriter
    from tests.output.test_writer import _encoded_batch

    monkeypatch.setattr(report_read, "PARTS_PER_TASK", 7)
    out = tmp_path / "out"
    writer = PartWriter(output=str(out), layout="webdataset", image_format="png", model=ModelInfo("tiny", "Euler"))
    for k in range(40):
        writer.write(_encoded_batch([f"r{k:02d}-{j}" for j in range(3)]))
    fs, root = filesystem(str(out))
    read = {
        name: report_read.read_output(fs, root, str(out), samples=9, executor=lambda _, e=executor: e)  # type: ignore[misc]
        for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor()))
    }
    local, ray_read = read["local"], read["ray"]
    assert (ray_read.metadata_rows, ray_read.metadata_parts) == (local.metadata_rows, local.metadata_parts) == (120, 40)
    assert ray_read.samples == local.samples and len(local.samples) == 9 and ray_read.images == local.images
    assert ray_read.records.parts == local.records.parts == 40
    assert ray_read.records.total.rows == local.records.total.rows == 120

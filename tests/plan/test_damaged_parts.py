"""Committed parts that cannot be read (zero bytes or truncated after a power loss), on local disk
and on S3: the planner names them and counts their rows as pending, `run` moves them aside
(`plan.parts.move_aside`), and `verify` lists them."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.io import filesystem
from pipeline.output.verify import DAMAGED_PROBLEM, verify_output
from pipeline.output.writer import ModelInfo, PartWriter
from pipeline.plan.job import plan_job
from pipeline.plan.parts import move_aside
from tests.helpers import write_config, write_manifest
from tests.output.test_writer import _encoded_batch

IDS = [f"id-{i:02d}" for i in range(9)]


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out"


def _committed(output: str) -> tuple[Any, str, list[str]]:
    """Three committed parts of three rows; returns the filesystem, root and the parts' paths."""
    writer = PartWriter(output=output, layout="files", image_format="png", model=ModelInfo("tiny", "Euler"))
    for start in (0, 3, 6):
        writer.write(_encoded_batch(IDS[start : start + 3]))
    fs, root = filesystem(output)
    fs.invalidate_cache()
    return fs, root, sorted(fs.glob(f"{root}/metadata/part-*.parquet"))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_part_is_named_its_rows_pending_and_moved_aside(output: str, damage: str, tmp_path: Path) -> None:
    fs, root, parts = _committed(output)
    victim = parts[1]
    data = fs.cat_file(victim)
    fs.pipe_file(victim, b"" if damage == "empty" else data[: len(data) // 2])
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in IDS])
    config = write_config(tmp_path / "job.yaml", manifest=str(manifest), output=output, model={"preset": "tiny"})

    from pipeline.core.config import load_config

    job = plan_job(load_config(config))
    damaged = job.manifest.damaged_parts
    assert [posixpath.basename(path) for path, _ in damaged] == [posixpath.basename(victim)]
    assert "ArrowInvalid" in damaged[0][1] or "OSError" in damaged[0][1]
    assert job.done_rows == 6 and job.pending_rows == 3  # the damaged part's rows are to be rendered again
    summary = "\n".join(job.summary_lines())
    assert f"damaged    1 committed part(s) cannot be read: {posixpath.basename(victim)}" in summary

    report = verify_output(output, manifest=str(manifest))
    assert not report.ok and any(p.startswith(DAMAGED_PROBLEM) for p in report.problems), report.summary()
    assert posixpath.basename(victim) in report.summary() and report.parts == 2

    moved = move_aside(fs, root, damaged)
    fs.invalidate_cache()
    assert not fs.exists(victim) and fs.exists(moved[0]) and moved[0].endswith(f"damaged/{posixpath.basename(victim)}")
    after = verify_output(output, manifest=str(manifest))
    assert not any(p.startswith(DAMAGED_PROBLEM) for p in after.problems)
    assert any(p.startswith("manifest id missing from the output (3)") for p in after.problems), after.summary()
    assert after.orphans.count == 4  # its 3 images and its stats record: removed at the end of the run

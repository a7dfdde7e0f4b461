"""benchmarks/part_records.py runs end to end at tiny size (the full-size report is committed under
benchmarks/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _table(lines: list[str], header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_part_records_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    """Every section is measured: the driver's loop per record, JobStats' memory (not growing per
    record by the model calls: their seconds go into a fixed-size sketch), Ray Data's iteration, encoding in the
    three formats and the writer in both layouts."""
    out = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "part_records.py"), "--records", "100", "--memory-records", "50,100",
         "--ray", "20:1,100:20,20:1:2", "--gpus", "16", "--distinct", "50", "--size", "64", "--encode-images", "1",
         "--write-rows", "4", "--graph-slices", "2", "--graph-parts", "512,64", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text().splitlines()
    driver = _table(lines, "step")
    assert [row[0] for row in driver][-1] == "the whole loop (`_execute`)"
    assert float(driver[-1][2].strip("*").removesuffix(" µs")) > 0
    memory = _table(lines, "GPUs")
    slopes = [row for row in memory if row[1] == "slope"]
    assert len(slopes) == 2  # 16 GPUs and 8
    assert all(float(row[5].split("**")[1].replace(",", "")) < 64 * 8 for row in slopes)  # < 8 bytes per call
    ray_rows = _table(lines, "rows")
    assert [row[3] for row in ray_rows] == ["1", "1", "2"]  # stages
    assert all(row[-1].endswith("%") for row in ray_rows)  # the driver's CPU in Python threads
    graph = _table(lines, "rows per part")
    stages = ["read, cut into slices (tasks)", "generate (actors)", "encode (tasks)", "write (tasks)"]
    assert [(row[0], row[1]) for row in graph] == [(p, stage) for p in ("512", "64") for stage in stages]
    encoding = _table(lines, "format")
    assert sorted({row[0] for row in encoding}) == ["jpeg", "png", "webp"]
    assert all(float(row[3]) > 0 for row in encoding)  # MB per image
    writes = _table(lines, "layout")
    assert [(row[0], row[3]) for row in writes] == [("files", "6"), ("webdataset", "3")]  # objects: images + 2, tar + 2

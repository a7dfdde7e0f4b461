"""Resume planning at scale: a 1,000,000-row manifest of which 900,000 rows are already done.

    .venv/bin/python benchmarks/resume_planning.py [--rows 1000000] [--done 900000]

Builds the manifest (10 files) and an output whose committed metadata parts list the first
`--done` ids, then runs `sdxl-batch run` (tiny model) and measures, from the command's start:
- planning done: the driver has read the manifest's key columns, the done ids and the pending
  fragments (its INFO log line "N of M rows to render");
- first new commit: the first part of the remaining rows is written (generation has started);
- the driver's peak resident memory (VmHWM from /proc, polled) up to that point.
The job is then stopped. Targets on the 2-core CI machine: under 60 s and under 2 GiB.
Writes benchmarks/results/resume_planning.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILES = 10
PART_ROWS = 1000


def build(work: Path, rows: int, done: int) -> Path:
    per_file = rows // FILES
    for f in range(FILES):
        ids = [f"row-{i:07d}" for i in range(f * per_file, (f + 1) * per_file)]
        table = pa.table(
            {
                "id": ids,
                "prompt": [f"a photo of a red dog number {i}" for i in range(len(ids))],
                "seed": range(len(ids)),
            }
        )
        pq.write_table(table, work / "manifest" / f"part-{f:03d}.parquet", row_group_size=10_000)
    metadata = work / "out" / "metadata"
    metadata.mkdir(parents=True)
    for p in range(done // PART_ROWS):
        ids = [f"row-{i:07d}" for i in range(p * PART_ROWS, (p + 1) * PART_ROWS)]
        table = pa.table(
            {
                "id": ids,
                "prompt": ["a photo of a red dog"] * PART_ROWS,
                "seed": range(PART_ROWS),
                "image_path": [f"images/00/{i}.png" for i in ids],
                "sha256": ["0" * 64] * PART_ROWS,
            }
        )
        pq.write_table(table, metadata / f"part-{p:020d}.parquet")
    config = work / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "manifest": str(work / "manifest"),
                "output": str(work / "out"),
                "model": {"preset": "tiny"},
                "generation": {"width": 64, "height": 64},
                "write": {"rows_per_part": 8},
            }
        )
    )
    return config


def peak_rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=900_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdxl-batch-resume-"))
    (work / "manifest").mkdir()
    config = build(work, args.rows, args.done)
    parts_before = len(list((work / "out" / "metadata").iterdir()))
    start, started_at = time.perf_counter(), datetime.now()
    process = subprocess.Popen(
        [str(REPO / ".venv/bin/sdxl-batch"), "-v", "run", str(config), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    peak, first_commit = 0.0, None
    while process.poll() is None and time.perf_counter() - start < 600:
        peak = max(peak, peak_rss_mib(process.pid))
        if len(list((work / "out" / "metadata").iterdir())) > parts_before:
            first_commit = time.perf_counter() - start
            break
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    _, stderr = process.communicate()
    planned = re.search(r"^(\S+ \S+) INFO pipeline.run.runner: (\d+) of (\d+) rows to render", stderr, re.M)
    assert planned and first_commit is not None, stderr[-3000:]
    planning = (datetime.strptime(planned.group(1), "%Y-%m-%d %H:%M:%S,%f") - started_at).total_seconds()
    table = "\n".join(
        [
            f"Resume planning: {args.rows:,} manifest rows ({FILES} files), {args.done:,} already done in "
            f"{parts_before} metadata parts; {os.cpu_count()} CPUs",
            "",
            "| measure | value | target |",
            "|---|---:|---:|",
            f"| command start → planning done ({planned.group(2)} of {planned.group(3)} rows pending) "
            f"| {planning:.1f} s | |",
            f"| command start → first new part committed (generation started) | {first_commit:.1f} s | < 60 s |",
            f"| driver peak resident memory until then | {peak:.0f} MiB | < 2048 MiB |",
        ]
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resume_planning.md").write_text(table + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

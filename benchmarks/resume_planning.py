"""Planning and resuming at scale: a manifest of `--rows` rows, `--done` of them already committed.

    .venv/bin/python benchmarks/resume_planning.py [--rows 1000000] [--done 900000] [--files 10]
    .venv/bin/python benchmarks/resume_planning.py --rows 100000000 --done 90000000 --files 100 \\
        --part-rows 10000 --skip-run

Builds the manifest (`--files` files of 10,000-row row groups, short prompts) and an output whose
committed metadata parts (`--part-rows` rows each, the real metadata schema) list the first
`--done` ids, with vectorised Arrow so that 100M rows build in minutes. Then measures, each as a
fresh `sdxl-batch` process (tiny model, embedded local Ray, as a user runs it):
- `sdxl-batch validate`: wall time and the process's peak resident memory (ru_maxrss);
- `sdxl-batch run` (unless `--skip-run`), from the command's start: planning done (its INFO line
  "N of M rows to render"), the first new part committed (generation has started), and the
  driver's peak resident memory until then (VmHWM from /proc, polled); the job is then stopped.
The driver is the `sdxl-batch` process; the planning tasks run in Ray's worker processes.
Targets (issue 16): driver peak <= 1 GiB at every size; 10M rows with 9M done: first new part
<= 60 s; `validate` of 100M rows <= 10 minutes. Appends a row to benchmarks/results/resume_planning.md.
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline.core.layout import metadata_schema
from pipeline.plan.schema import conform

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLI = str(REPO / ".venv/bin/sdxl-batch")
ROW_GROUP = 10_000


def _ids(start: int, stop: int) -> pa.Array:
    numbers = pc.cast(pa.array(np.arange(start, stop, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise("row-", pc.utf8_lpad(numbers, 9, "0"), "")


def build(work: Path, rows: int, done: int, files: int, part_rows: int) -> tuple[Path, int, int]:
    """The manifest, the committed parts and the job config; returns the config, the manifest's
    bytes and the number of parts."""
    per_file = rows // files
    manifest_bytes = 0
    for f in range(files):
        ids = _ids(f * per_file, (f + 1) * per_file)
        prompts = pc.binary_join_element_wise("a photo of a red dog number ", pc.utf8_slice_codeunits(ids, 4), "")
        table = pa.table({"id": ids, "prompt": prompts, "seed": np.arange(per_file, dtype=np.int64)})
        path = work / "manifest" / f"part-{f:03d}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP)
        manifest_bytes += path.stat().st_size
    metadata = work / "out" / "metadata"
    metadata.mkdir(parents=True)
    schema = metadata_schema(pa.schema([]))
    parts = 0
    for p, start in enumerate(range(0, done, part_rows)):
        ids = _ids(start, min(start + part_rows, done))
        table = conform(pa.table({"id": ids, "prompt": ids, "seed": np.zeros(len(ids), dtype=np.int64)}), schema)
        pq.write_table(table, metadata / f"part-{p:020d}.parquet")
        parts += 1
    config = work / "job.yaml"
    job = {
        "manifest": str(work / "manifest"),
        "output": str(work / "out"),
        "model": {"preset": "tiny"},
        "generation": {"width": 64, "height": 64},
        "write": {"rows_per_part": 8},
    }
    config.write_text(yaml.safe_dump(job))
    # The committed parts were made with these settings (a resumed output keeps its fingerprint).
    fingerprint = subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-c",
            "import json, sys; from pipeline.core.config import load_config; "
            "from pipeline.plan.ledger import settings_fingerprint; "
            "print(json.dumps({'fingerprint': settings_fingerprint(load_config(sys.argv[1]))}))",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    (work / "out" / "job.json").write_text(fingerprint)
    return config, manifest_bytes, parts


def peak_rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def measure_validate(config: Path) -> tuple[float, float, str]:
    start = time.perf_counter()
    process = subprocess.Popen([CLI, "validate", str(config)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return time.perf_counter() - start, usage.ru_maxrss / 1024, output


def measure_run(work: Path, config: Path, parts_before: int) -> tuple[float, float, float, str]:
    start, started_at = time.perf_counter(), datetime.now()
    process = subprocess.Popen(
        [CLI, "-v", "run", str(config), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metadata = work / "out" / "metadata"
    peak, first_commit = 0.0, None
    while process.poll() is None and time.perf_counter() - start < 1200:
        peak = max(peak, peak_rss_mib(process.pid))
        if sum(1 for p in metadata.iterdir() if p.name.startswith("part-")) > parts_before:
            first_commit = time.perf_counter() - start
            break
        time.sleep(0.1)
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    _, stderr = process.communicate()
    planned = re.search(r"^(\S+ \S+) INFO pipeline.run.runner: (\d+) of (\d+) rows to render", stderr, re.M)
    assert planned and first_commit is not None, stderr[-3000:]
    planning = (datetime.strptime(planned.group(1), "%Y-%m-%d %H:%M:%S,%f") - started_at).total_seconds()
    return planning, first_commit, peak, f"{int(planned.group(2)):,} of {int(planned.group(3)):,} rows pending"


HEADER = [
    "| rows (done) | files / parts | manifest | `validate` | `validate` peak | run: planning done | "
    "run: first new part | run: driver peak |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=900_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--part-rows", type=int, default=1000, help="rows per committed metadata part")
    parser.add_argument("--skip-run", action="store_true", help="measure validate only")
    parser.add_argument("--work", help="build here (kept); default: a temporary folder, removed after")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sdxl-batch-resume-"))
    (work / "manifest").mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        config, manifest_bytes, parts = build(work, args.rows, args.done, args.files, args.part_rows)
        print(f"built in {time.perf_counter() - began:.0f} s: {manifest_bytes / 2**20:.0f} MiB manifest, {parts} parts")
        validate_seconds, validate_peak, summary = measure_validate(config)
        print(summary)
        run = None if args.skip_run else measure_run(work, config, parts)
    finally:
        if not args.work:
            shutil.rmtree(work)
    cells = [
        f"{args.rows:,} ({args.done:,})",
        f"{args.files} / {parts:,}",
        f"{manifest_bytes / 2**20:,.0f} MiB",
        f"{validate_seconds:.1f} s",
        f"{validate_peak:.0f} MiB",
        *([f"{run[0]:.1f} s", f"{run[1]:.1f} s", f"{run[2]:.0f} MiB"] if run else ["not run", "not run", "not run"]),
    ]
    row = "| " + " | ".join(cells) + " |"
    print("\n".join([*HEADER, row]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "resume_planning.md"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines or lines[: len(HEADER) + 2][-len(HEADER) :] != HEADER:
        lines = [
            f"Planning and resuming: a manifest of short prompts (10,000-row row groups), part of it committed; "
            f"{os.cpu_count()} CPUs, embedded local Ray, tiny model. One row per run of benchmarks/resume_planning.py.",
            "",
            *HEADER,
        ]
    # The row goes at the end of the results table, before any notes written under it.
    end = len(HEADER) + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

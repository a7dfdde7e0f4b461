"""Validating and starting a 1,000,000-row manifest: the driver streams it, never holds its rows.

    .venv/bin/python benchmarks/manifest_scale.py [--rows 1000000] [--bad 1000]

Builds a manifest of `--rows` rows in 10 files (10,000-row row groups) with realistic prompts
(about 200 characters), negative prompts, per-row sizes on a tenth of the rows and a pass-through
column, with `--bad` bad rows spread through it (empty prompts, negative seeds, widths that are
not multiples of 8, duplicate ids). Then measures, on the tiny model, with `on_bad_row: skip`:
- `sdxl-batch validate`: wall time and the process's peak resident memory (ru_maxrss);
- `sdxl-batch run` on a new output: command start → planning done, → rejects written, → first
  part committed (generation started), and the driver's peak resident memory until then (VmHWM,
  polled); the job is then stopped.
Target: driver memory well under 2 GiB, far less than the manifest's rows in memory.
Writes benchmarks/results/manifest_scale.md.
"""

from __future__ import annotations

import argparse
import os
import random
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
CLI = str(REPO / ".venv/bin/sdxl-batch")
FILES = 10
SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a clockwork owl", "a desert caravan"]
STYLES = ["oil painting", "35mm photograph", "isometric render", "watercolour", "studio portrait"]


def build(work: Path, rows: int, bad: int) -> tuple[Path, int, int]:
    """The manifest and the job config; returns the config, the manifest's bytes on disk and the
    bytes its rows take in memory as Arrow."""
    rng = random.Random(0)
    per_file = rows // FILES
    bad_rows = set(rng.sample(range(rows), bad))
    disk = memory = 0
    for f in range(FILES):
        start = f * per_file
        ids, prompts, seeds, widths = [], [], [], []
        for i in range(start, start + per_file):
            kind = (i % 4) if i in bad_rows else None
            ids.append(f"row-{i - 1:07d}" if kind == 3 else f"row-{i:07d}")  # duplicate of the previous id
            text = f"{rng.choice(SUBJECTS)} in the style of a {rng.choice(STYLES)}, detailed, {i}, " * 2
            prompts.append("" if kind == 0 else text[:200])
            seeds.append(-i if kind == 1 else rng.randrange(2**63))
            widths.append(1003 if kind == 2 else (768 if i % 10 == 0 else None))
        table = pa.table(
            {
                "id": ids,
                "prompt": prompts,
                "negative_prompt": ["blurry, low quality" if i % 3 == 0 else None for i in range(per_file)],
                "seed": pa.array(seeds, pa.int64()),
                "width": pa.array(widths, pa.int32()),
                "source": [f"batch-{i // 1000}" for i in range(per_file)],
            }
        )
        path = work / "manifest" / f"part-{f:03d}.parquet"
        pq.write_table(table, path, row_group_size=10_000)
        disk += path.stat().st_size
        memory += table.nbytes
    config = work / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "manifest": str(work / "manifest"),
                "output": str(work / "out"),
                "on_bad_row": "skip",
                "model": {"preset": "tiny"},
                "generation": {"width": 64, "height": 64},
                "write": {"rows_per_part": 8},
            }
        )
    )
    return config, disk, memory


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


def measure_run(work: Path, config: Path) -> dict[str, float]:
    start, started_at = time.perf_counter(), datetime.now()
    process = subprocess.Popen(
        [CLI, "-v", "run", str(config), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metadata, rejects = work / "out" / "metadata", work / "out" / "rejects"
    peak, rejects_at, first_commit = 0.0, None, None
    while process.poll() is None and time.perf_counter() - start < 600:
        peak = max(peak, peak_rss_mib(process.pid))
        if rejects_at is None and rejects.exists() and len(list(rejects.iterdir())) == FILES:
            rejects_at = time.perf_counter() - start
        if metadata.exists() and any(metadata.iterdir()):
            first_commit = time.perf_counter() - start
            break
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    _, stderr = process.communicate()
    planned = re.search(r"^(\S+ \S+) INFO pipeline.run.runner: (\d+) of (\d+) rows to render", stderr, re.M)
    assert planned and first_commit is not None and rejects_at is not None, stderr[-3000:]
    planning = (datetime.strptime(planned.group(1), "%Y-%m-%d %H:%M:%S,%f") - started_at).total_seconds()
    return {"planning": planning, "rejects": rejects_at, "first_commit": first_commit, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--bad", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdxl-batch-scale-"))
    (work / "manifest").mkdir()
    try:
        config, disk, memory = build(work, args.rows, args.bad)
        validate_seconds, validate_peak, summary = measure_validate(config)
        bad_line = next(line for line in summary.splitlines() if line.startswith("bad rows"))
        run = measure_run(work, config)
    finally:
        shutil.rmtree(work)
    table = "\n".join(
        [
            f"Manifest scale: {args.rows:,} rows in {FILES} files ({disk / 2**20:.0f} MiB of Parquet, "
            f"{memory / 2**20:.0f} MiB as Arrow in memory), {args.bad:,} bad rows planted; "
            f"on_bad_row: skip; {os.cpu_count()} CPUs",
            f"validate: `{bad_line.strip()}`",
            "",
            "| measure | value | target |",
            "|---|---:|---:|",
            f"| `sdxl-batch validate`: wall time | {validate_seconds:.1f} s | |",
            f"| `sdxl-batch validate`: peak resident memory | {validate_peak:.0f} MiB | < 2048 MiB |",
            f"| `sdxl-batch run`: command start → planning done | {run['planning']:.1f} s | |",
            f"| `sdxl-batch run`: command start → rejects/ written | {run['rejects']:.1f} s | |",
            f"| `sdxl-batch run`: command start → first part committed | {run['first_commit']:.1f} s | < 60 s |",
            f"| `sdxl-batch run`: driver peak resident memory until then | {run['peak']:.0f} MiB | < 2048 MiB |",
        ]
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "manifest_scale.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

"""How well `sdxl-batch tune` keeps a cluster's GPUs busy, and what running trials in parallel saves.

    .venv/bin/python benchmarks/tune_occupancy.py [--gpu-seconds 0.5] [--rows 8]

Starts a loopback Ray cluster of two worker nodes with two logical GPUs each, one node of type
GPU_A and one of GPU_B (four GPUs), as the tests do. The GPUs are logical: the tiny model renders
on the CPU, and each model call first sleeps `--gpu-seconds` (`tests/integration/inject`), the
time a GPU would be busy, so that the figures measure tune's scheduling rather than this machine's
two cores. The same space is tuned twice, from nothing (`--fresh`): with one trial per GPU at once
(the default) and with one trial at a time (`--max-concurrent 1`, as tune ran before it used
Ray Tune). The space: float32, attention sdpa or eager, 1 or 2 actors per GPU (4 load settings per
type), batch sizes 1, 2, 4 with the actors running out of memory above 2 (the probe), grid search.

Measured, from each run's tune.json:
- occupancy: the sum of the trials' times over (GPUs x wall time), over the whole command and over
  the trials' own span (target >= 0.8 on four logical GPUs);
- model loads per GPU type against the load settings of the type (each load setting loads the
  model once per actor, whatever the batch sizes measured on it);
- the wall time of the parallel and of the sequential run.
Appends a row to benchmarks/results/tune_occupancy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import prompt_rows, write_config, write_manifest  # noqa: E402
from tests.integration.conftest import INJECT, loopback_cluster  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CLI = str(REPO / ".venv/bin/sdxl-batch")
TYPES = ("GPU_A", "GPU_B")
SPACE = [
    "--dtypes", "fp32", "--compile", "off", "--attention", "sdpa,eager", "--fuse-qkv", "off", "--channels-last", "off",
    "--actors-per-gpu", "1,2", "--batch-sizes", "1,2,4", "--reference", "fp32", "--search", "grid",
]  # fmt: skip
HEADER = [
    "| date | GPUs | loads (per type) | measurements | parallel: wall | occupancy (command / trials) | "
    "sequential: wall | occupancy (command / trials) | speed-up | models loaded per type (load settings x actors) | "
    "failed loads (parallel / sequential) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
]


def run_tune(job: Path, folder: Path, env: dict[str, str], extra: list[str]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = subprocess.run(
        [CLI, "tune", str(job), *SPACE, "--fresh", "--no-progress", "--work-dir", str(folder),
         "--cache-dir", str(folder / "cache"), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"tune failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    print(result.stdout.strip().splitlines()[-6:], flush=True)
    return json.loads((folder / "tune.json").read_text()), wall


def failed_loads(record: dict[str, Any]) -> list[str]:
    """The loads that did not finish (each a trial that measured nothing), with their errors."""
    return [f"{load['load_key']} on {load['accelerator_type']}: {load['status']}" for load in record["loads"]
            if load["status"] != "ok"]  # fmt: skip


def models_per_type(record: dict[str, Any]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for load in record["loads"]:
        counts[load["accelerator_type"]] += load["loads"]
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-seconds", type=float, default=0.5, help="a model call's emulated GPU time")
    parser.add_argument("--rows", type=int, default=8, help="rows per measurement")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdxl-batch-tune-bench-"))
    job = write_config(
        work / "job.yaml", manifest=str(write_manifest(work / "m.parquet", prompt_rows(40))), output=str(work / "out"),
        model={"preset": "tiny", "dtype": "float32"}, generation={"width": 64, "height": 64},
    )  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")]))
    with loopback_cluster(
        work / "cluster", dashboard=False, worker_cpus=4, worker_gpus=2, worker_types=TYPES,
        worker_env={"PYTHONPATH": pythonpath},
    ) as cluster:  # fmt: skip
        env = {
            **os.environ, **cluster.env, "PYTHONPATH": pythonpath, "RAY_RUNTIME_ENV_HOOK": "forward_env.hook",
            "SDXL_BATCH_TEST_SLOW_GENERATE": str(args.gpu_seconds), "SDXL_BATCH_TEST_OOM_ABOVE": "2",
        }  # fmt: skip
        common = ["--address", cluster.address, "--sample", str(args.rows)]
        parallel, parallel_wall = run_tune(job, work / "parallel", env, common)
        sequential, sequential_wall = run_tune(job, work / "sequential", env, [*common, "--max-concurrent", "1"])
    settings = len({(t["settings"]["attention"], t["settings"]["actors_per_gpu"]) for t in parallel["trials"]})
    loads = Counter(load["accelerator_type"] for load in parallel["loads"])
    expected = {name: sum(a for a in (1, 2)) * 2 for name in TYPES}  # 2 attention x (1 + 2 actors)

    def share(record: dict[str, Any]) -> str:
        occupancy = record["occupancy"]
        return f"{occupancy['command']:.2f} / {occupancy['trials']:.2f}"

    cells = [
        datetime.now().strftime("%Y-%m-%d"),
        "4 (2 x GPU_A, 2 x GPU_B)",
        f"{sum(loads.values())} ({', '.join(f'{n} {k}' for k, n in sorted(loads.items()))})",
        str(len(parallel["trials"])),
        f"{parallel_wall:.0f} s",
        share(parallel),
        f"{sequential_wall:.0f} s",
        share(sequential),
        f"{sequential_wall / parallel_wall:.2f}x",
        ", ".join(
            f"{k}: {n} (expected {expected[k]}: {settings} settings)" for k, n in models_per_type(parallel).items()
        ),
        f"{len(failed_loads(parallel))} / {len(failed_loads(sequential))}",
    ]
    for failure in failed_loads(parallel) + failed_loads(sequential):
        print(f"failed load: {failure}", flush=True)
    row = "| " + " | ".join(cells) + " |"
    print("\n".join([*HEADER, row]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "tune_occupancy.md"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        lines = [
            f"Tuning occupancy on a loopback cluster: 2 nodes x 2 logical GPUs (types GPU_A, GPU_B), "
            f"{os.cpu_count()} CPUs in all, tiny model at 64x64, {args.gpu_seconds:g} s of emulated GPU time per "
            f"model call, {args.rows} rows per measurement. One row per run of benchmarks/tune_occupancy.py.",
            "",
            *HEADER,
        ]
    end = len(HEADER) + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

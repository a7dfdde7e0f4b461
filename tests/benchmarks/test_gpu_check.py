"""The GPU check (benchmarks/gpu_throughput.py) runs end to end at tiny size on CPU, as a bare
CUDA machine without ray or s3fs would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_at_tiny_size_without_ray_or_s3fs(tmp_path: Path) -> None:
    """benchmarks/gpu_throughput.py --quick, as a bare CUDA machine runs it (no ray, no s3fs: both
    made unimportable here), at tiny size: every row loads the generator from saved files, is
    tabulated as soon as measured, and a switch that fails (flash in float32, refused) records
    its error while the rest runs on."""
    script = REPO / "benchmarks" / "gpu_throughput.py"
    argv = [str(script), "--size", "tiny", "--quick", "--warmup", "1", "--iters", "1", "--results-dir", str(tmp_path)]
    blocked = f"import runpy, sys; sys.modules.update(ray=None, s3fs=None); sys.argv = {argv!r}; "
    # On the CPU wherever this runs: the script picks CUDA where torch sees it, and its CPU table is checked here.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", blocked + f"runpy.run_path({str(script)!r}, run_name='__main__')"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = tmp_path.glob("gpu_throughput-cpu-tiny.md")
    rows = [
        line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line
    ]
    rows = [[cell.strip() for cell in row] for row in rows[1:]]  # below the header
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("defaults", "lightning-4step", "4"), ("defaults", "lightning-4step", "8"), ("defaults", "turbo", "8"),
        ("defaults", "sdxl-base", "4"), ("LoRA loaded and fused (kohya layout)", "lightning-lora-4step", "8"),
        ("all switches on (defaults)", "lightning-4step", "8"),
        ("channels_last off", "lightning-4step", "8"), ("vae_channels_last off", "lightning-4step", "8"),
        ("fuse_qkv off", "lightning-4step", "8"), ("pinned_copy off", "lightning-4step", "8"),
        ("attention eager", "lightning-4step", "8"), ("attention flash", "lightning-4step", "8"),
        ("VAE undivided (vae_batch_size 8)", "lightning-4step", "8"),
    ]  # fmt: skip
    for row in rows:
        if row[0] == "attention flash":
            assert row[4].startswith("error: ValidationError") and "flash needs a 16-bit dtype" in row[4]
            continue
        assert float(row[6]) > 0  # images/s measured
        assert 0 < float(row[9]) <= float(row[8]) and float(row[10]) >= 0 and row[11] == "-"  # work, idle, syncs
        if row[3] != "8" or row[1] != "lightning-4step" or row[0] != "defaults":  # the first row of each load
            assert float(row[4]) > 0 and float(row[5]) >= float(row[4])  # load, then first image
    assert "target (>= 10 images/s" in table.read_text()

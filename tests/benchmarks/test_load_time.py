"""benchmarks/load_time.py runs end to end at tiny size (the full-size table is committed under
benchmarks/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_load_time_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    """benchmarks/load_time.py's smoke test: a tiny checkpoint, the old path and the new loader, tabulated."""
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "load_time.py"), "--size", "tiny", "--repeats", "1",
         "--methods", "old,new-bfloat16-pread-cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[1].strip() for row in rows[1:]] == [
        "read (pread): load_file, every tensor read into memory",
        "old: from_config + load_state_dict + cast",
        "new: load_unet_file (safetensors pread)",
    ]
    assert all(float(row[5]) > 0 for row in rows[1:])  # seconds measured

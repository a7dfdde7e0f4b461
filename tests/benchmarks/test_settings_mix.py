"""benchmarks/settings_mix.py runs end to end on a small manifest, and its counts hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_settings_mix_counts_fewer_calls_in_runs_of_equal_settings(tmp_path: Path) -> None:
    out = tmp_path / "mix.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "settings_mix.py"), "--rows", "4000", "--row-group", "1000",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split("|")[2:6] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line
    ]
    before, buckets, after = ([float(cell) for cell in row] for row in rows[1:])
    assert before[1] == buckets[1] == after[1] == 1000  # every image rendered once
    assert after[0] < before[0] / 4  # a few groups of 12 per batch of 8 before; one after
    assert before[2] > 4 * after[2] and after[2] < 1050  # padding to the batch against powers of two

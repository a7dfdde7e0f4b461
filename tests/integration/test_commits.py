"""Parts commit from the first model calls on, not when the job ends: a 48-row job with 8-row
parts, killed as a preemption would (SIGKILL to the whole process group) once two parts are in,
keeps them, and the rerun renders only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import CLI, REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest
from tests.integration.conftest import INJECT

pytestmark = pytest.mark.integration


def _committed(output: Path) -> dict[str, bytes]:
    folder = output / "metadata"
    return {p.name: p.read_bytes() for p in folder.glob("*.parquet")} if folder.exists() else {}


def test_parts_commit_as_calls_return_and_a_kill_keeps_them(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(48))
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml", manifest=str(manifest), output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64}, write={"rows_per_part": 8},
    )  # fmt: skip
    # 12 model calls of 4 images, each made to last at least 0.5 s: 6 s of rendering at the least.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(INJECT), env.get("PYTHONPATH")])))
    env["SDXL_BATCH_TEST_SLOW_GENERATE"] = "0.5"
    job = subprocess.Popen(
        [*CLI, "run", str(config), "--no-progress"], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(_committed(output)) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        kept = _committed(output)
        still_running = job.poll() is None
        os.killpg(job.pid, signal.SIGKILL)  # the whole job at once, as a preempted machine
    finally:
        job.wait(timeout=60)
    # Two parts (16 of 48 rows) were in while the job still had at least 4 calls (2 s) to render.
    assert still_running and 2 <= len(kept) <= 4, (still_running, sorted(kept))
    time.sleep(1)  # Ray's processes of the killed job go with it
    assert all(_committed(output)[name] == data for name, data in kept.items())

    rerun = run_cli("run", str(config), "--no-progress", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Rendered {48 - 8 * len(kept)} images" in rerun.stdout, rerun.stdout
    after = _committed(output)
    assert all(after[name] == data for name, data in kept.items())  # the killed job's parts, untouched
    assert sorted(read_metadata(str(output)).column("id").to_pylist()) == [f"row-{i:04d}" for i in range(48)]
    verify = run_cli("verify", str(output), "--manifest", str(manifest))
    assert verify.returncode == 0 and "OK: every row exactly once" in verify.stdout, verify.stdout + verify.stderr

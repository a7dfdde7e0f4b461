"""Resume, incremental and overwrite modes through the real CLI, checked with `sdxl-batch verify`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import CLI, REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, model_cache: Path, manifest: Path, output: Path) -> Path:
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"rows_per_part": 5},
    )


def _start(*args: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen([*CLI, *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _verify(output: Path, manifest: Path) -> None:
    result = run_cli("verify", str(output), "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every row exactly once" in result.stdout


def test_resume_incremental_fingerprint_and_overwrite(tmp_path: Path, model_cache: Path) -> None:
    manifests = tmp_path / "manifests"
    write_manifest(manifests / "day-1.parquet", prompt_rows(10))
    output = tmp_path / "out"
    config = _config(tmp_path, model_cache, manifests, output)

    # Two runs racing for the same empty output: one takes the lease and renders, the other stops at once.
    racing = [_start("run", str(config), "--no-progress") for _ in range(2)]
    results = sorted((p.wait(timeout=300), *p.communicate()) for p in racing)
    assert [code for code, _, _ in results] == [0, 2], results
    loser = results[1][2]
    assert f"error: the output {output} is being written by `run` (host " in loser, loser
    assert "Wait for that job to finish" in loser and "Traceback" not in loser
    assert not (output / "lease.json").exists()  # released at the end
    _verify(output, manifests)

    # A committed part left empty (as by a power loss before commits were fsynced): it is moved
    # aside, and only its rows are rendered again.
    all_ids = set(read_metadata(str(output)).column("id").to_pylist())
    damaged = sorted((output / "metadata").iterdir())[0]
    damaged.write_bytes(b"")
    resumed = run_cli("run", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed: 5 of 10 rows were already done" in resumed.stdout and "Rendered 5 images" in resumed.stdout
    assert f"moved 1 damaged committed part(s) aside to {output}/damaged ({damaged.name}: " in resumed.stderr
    assert (output / "damaged" / damaged.name).exists()
    _verify(output, manifests)
    assert set(read_metadata(str(output)).column("id").to_pylist()) == all_ids

    # Each run that rendered is kept; stats.json sums them for the output.
    whole = json.loads((output / "stats.json").read_text())["output"]
    assert whole["runs"] == 2 and whole["images"] == 15 and [r["rows"] for r in whole["by_run"]] == [10, 5]

    # Nothing left: no Ray, no rendering, and the output's figures stay as they were.
    before = (output / "stats.json").read_bytes()
    again = run_cli("run", str(config), "--no-progress")
    assert "Rendered 0 images: every row was already done" in again.stdout
    assert (output / "stats.json").read_bytes() == before and len(list((output / "stats" / "runs").iterdir())) == 2

    # Incremental: a new file under the manifest prefix is rendered, the old rows are skipped.
    write_manifest(manifests / "day-2.parquet", prompt_rows(3, start=10))
    incremental = run_cli("run", str(config), "--no-progress")
    assert "Resumed: 10 of 13" in incremental.stdout and "Rendered 3 images" in incremental.stdout
    _verify(output, manifests)

    # Other settings into the same output are refused, naming what changed.
    refused = run_cli("run", str(config), "--no-progress", "--set", "generation.width=128")
    assert refused.returncode == 2
    assert "width: 64 -> 128" in refused.stderr and "--overwrite" in refused.stderr

    # --overwrite discards and re-renders everything with the new settings.
    overwritten = run_cli("run", str(config), "--no-progress", "--overwrite", "--set", "generation.width=128")
    assert overwritten.returncode == 0, overwritten.stderr
    assert "Rendered 13 images" in overwritten.stdout
    assert set(read_metadata(str(output)).column("width").to_pylist()) == {128}
    _verify(output, manifests)
    assert json.loads((output / "job.json").read_text())["fingerprint"]["settings"]["width"] == 128
    assert json.loads((output / "stats.json").read_text())["output"]["runs"] == 1  # --overwrite starts afresh

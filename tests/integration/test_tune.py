"""`sdxl-batch tune` and `sdxl-batch estimate` on the tiny model, end to end through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_config
from tests.helpers import prompt_rows, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration
INJECT = Path(__file__).with_name("inject")


@pytest.fixture
def job(tmp_path: Path, model_cache: Path) -> Path:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(6))
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 2, "width": 64, "height": 64},
        write={"rows_per_part": 4},
        storage={"key": "AKIAFAKETUNEKEY00001", "secret": "tune-secret-not-copied"},
    )


def test_tune_sweeps_records_out_of_memory_and_writes_the_best_config(tmp_path: Path, job: Path) -> None:
    work = tmp_path / "tune"
    # The actors see a "GPU" that holds 2 images per call: the batch-4 trial runs out of memory.
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "SDXL_BATCH_TEST_OOM_ABOVE": "2",
    }
    result = run_cli(
        "tune", str(job), "--batch-sizes", "1,2,4", "--sample", "8", "--gpu-hour-price", "3.6",
        "--work-dir", str(work), "--no-progress", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout
    for name in ("b1-a1-float32-eager", "b2-a1-float32-eager", "b4-a1-float32-eager"):
        assert name in table
    assert "out of memory (split to 2)" in table and "3 trial(s) on 8 rows each; 1 did not count" in table

    record = json.loads((work / "tune.json").read_text())
    trials = {t["name"]: t for t in record["trials"]}
    assert trials["b4-a1-float32-eager"]["status"].startswith("out of memory")
    for name in ("b1-a1-float32-eager", "b2-a1-float32-eager"):
        trial = trials[name]
        assert trial["status"] == "ok" and trial["rows"] == 8 and trial["images_per_second"] > 0
        assert trial["peak_memory_mb"] > 0
        # Cost of 1,000 images at 3.6 per hour = 1 per 1,000 seconds of work.
        assert trial["cost_per_1000"] == pytest.approx(1 / trial["images_per_second"], rel=1e-6)
    best = record["best"]
    assert (
        best["name"]
        == max((t for t in record["trials"] if t["status"] == "ok"), key=lambda t: t["images_per_second"])["name"]
    )
    assert f"Best: {best['name']}" in table

    # The best config is a working job config with the winner's settings, without the credentials.
    text = (work / "best.yaml").read_text()
    assert "tune-secret-not-copied" not in text and "AKIAFAKETUNEKEY00001" not in text
    config = load_config(work / "best.yaml")
    assert config.generation.batch_size == best["batch_size"] and config.model.dtype == "float32"
    assert config.manifest == yaml.safe_load(job.read_text())["manifest"] and config.generation.width == 64

    # estimate --from: the tuning result's trial with the job's own settings (batch 2).
    estimate = run_cli("estimate", str(job), "--from", str(work / "tune.json"), "--gpu-hour-price", "3.6")
    assert estimate.returncode == 0, estimate.stderr
    assert "rows to render   6" in estimate.stdout and "the trial with this job's settings" in estimate.stdout
    rate = trials["b2-a1-float32-eager"]["images_per_second"]
    assert f"{rate:.3f} images/s" in estimate.stdout and "per machine-hour" in estimate.stdout
    # Other image settings than the tuning measured: refused with what to do.
    other = run_cli("estimate", str(job), "--from", str(work / "tune.json"), "--set", "generation.steps=2")
    assert other.returncode == 2 and "run `sdxl-batch tune` with this config" in other.stderr


def test_estimate_from_a_calibration_run(tmp_path: Path, job: Path) -> None:
    result = run_cli(
        "estimate", str(job), "--sample", "4", "--gpu-hour-price", "2", "--no-progress",
        "--set", "resources.gpu_hour_price=1", "--work-dir", str(tmp_path / "estimate"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert "calibration run of 4 rows" in result.stdout and lines["rows"].startswith("to render   6")
    assert "at 2 per machine-hour" in result.stdout  # the flag wins over the config
    assert float(lines["throughput"].split()[0]) > 0
    assert not (tmp_path / "out").exists()  # the job's output is untouched

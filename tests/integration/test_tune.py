"""`sdxl-batch tune` and `sdxl-batch estimate` on one machine without GPUs (embedded Ray), through
the CLI: the machine is the only "type", and its trials run one after another."""

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
# A machine without GPUs wherever this runs: CUDA hidden from the CLI, whose embedded Ray then
# counts no GPUs (tune's one type is the machine's CPU) and whose actors' torch sees none.
NO_GPUS = {"CUDA_VISIBLE_DEVICES": ""}


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
        resources={"torch_threads": 2},
        storage={"key": "AKIAFAKETUNEKEY00001", "secret": "tune-secret-not-copied"},
    )


def test_tune_probes_memory_records_out_of_memory_and_writes_the_best_config(tmp_path: Path, job: Path) -> None:
    work = tmp_path / "tune"
    # The actors see a "GPU" that holds 2 images per call: batch 4 runs out of memory.
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "SDXL_BATCH_TEST_OOM_ABOVE": "2",
        **NO_GPUS,
    }
    result = run_cli(
        "tune", str(job), "--batch-sizes", "1,2,4", "--sample", "8", "--gpu-hour-price", "3.6",
        "--work-dir", str(work), "--cache-dir", str(tmp_path / "cache"), "--no-progress", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "this machine (no GPUs)" in table and "3.6 per machine-hour" in table
    assert "infeasible: out of memory" in table and "best (" in table

    record = json.loads((work / "tune.json").read_text())
    trials = {t["batch_key"]: t for t in record["trials"]}
    assert list(record["types"]) == ["CPU"] and len(record["loads"]) == 1 and record["loads"][0]["loads"] == 1
    assert trials["b4"]["status"] == "infeasible: out of memory"  # the probe: largest first
    for key in ("b1", "b2"):
        trial = trials[key]
        assert trial["status"] == "ok" and trial["rows"] == 8 and trial["images_per_second"] > 0
        assert trial["peak_memory_mb"] > 0 and len(trial["windows"]) == 3 and trial["spread"] >= 0
        assert trial["busy_fraction"] is not None and trial["cost_per_1000"] > 0
    best = record["best"]["CPU"]
    assert best["batch_key"] in ("b1", "b2") and best["reason"]
    assert f"Best on CPU: fp32-sdpa-a1 {best['batch_key']}" in table

    # The best config works as it is, from anywhere: absolute paths, no thread count, no credentials.
    text = (work / "best.yaml").read_text()
    assert "tune-secret-not-copied" not in text and "AKIAFAKETUNEKEY00001" not in text
    config = load_config(work / "best.yaml")
    assert config.generation.batch_size == best["settings"]["batch_size"] and config.model.dtype == "float32"
    assert config.manifest == str(tmp_path / "m.parquet") and config.generation.width == 64
    assert config.resources.torch_threads is None and "fleet" not in yaml.safe_load(text)

    # estimate --from: the tuned rate on this machine.
    estimate = run_cli("estimate", str(job), "--from", str(work / "tune.json"), "--gpu-hour-price", "3.6", env=NO_GPUS)
    assert estimate.returncode == 0, estimate.stderr
    assert "rows to render   6" in estimate.stdout and "1 x CPU" in estimate.stdout
    assert f"{best['images_per_second']:.3g}" in estimate.stdout or "images/s" in estimate.stdout
    # Other image settings than the tuning measured: refused with what to do.
    other = run_cli("estimate", str(job), "--from", str(work / "tune.json"), "--set", "generation.steps=2", env=NO_GPUS)
    assert other.returncode == 2 and "run `sdxl-batch tune` with this config" in other.stderr


def test_estimate_from_a_calibration_run(tmp_path: Path, job: Path) -> None:
    result = run_cli(
        "estimate", str(job), "--sample", "4", "--gpu-hour-price", "2", "--no-progress",
        "--set", "resources.gpu_hour_price=1", "--work-dir", str(tmp_path / "estimate"), env=NO_GPUS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert "calibration run" in result.stdout and lines["rows"].startswith("to render   6")
    assert float(lines["throughput"].split()[0]) > 0 and "cost" in lines
    assert not (tmp_path / "out").exists()  # the job's output is untouched

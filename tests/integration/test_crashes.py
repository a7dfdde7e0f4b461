"""Worker processes that die: a crash that repeats stops the job within `resources.max_retries`
with our own error; a one-off crash is retried and the job completes.

Ray Data's defaults restart actors and retry tasks for ever: before the bound, each of these
jobs was still crashing and reloading after 120 s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import prompt_rows, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration
INJECT = Path(__file__).with_name("inject")


def _job(tmp_path: Path, model_cache: Path, **resources: int | bool) -> tuple[Path, Path, Path]:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(8))
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"rows_per_part": 4},
        resources={"actors": 1, "in_process": False, **resources},  # Ray's restarts and retries
    )
    return manifest, output, config


def _crash_env(where: str, log: Path, **extra: str) -> dict[str, str]:
    """Every process of the job (Ray's workers too) kills itself with SIGSEGV at `where`."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "SDXL_BATCH_TEST_CRASH": where,
        "SDXL_BATCH_TEST_CRASH_LOG": str(log),
        **extra,
    }


@pytest.mark.parametrize(
    ("where", "max_retries", "message"),
    [
        # (a) a corrupt weight file or a bad driver that segfaults on load
        ("load", 1, "the generator actor's process died while loading the model, 2 times"),
        # (b) a model that loads, then a GPU driver that crashes in the first kernel (default bound: 2)
        ("generate", None, "the generator actor's process died while rendering a batch, 3 times"),
        # (c) a CPU task whose worker dies every time
        ("encode", 0, "the worker process running an encode task died once"),
    ],
)
def test_a_crash_that_repeats_stops_the_job_within_the_bound(
    where: str, max_retries: int | None, message: str, tmp_path: Path, model_cache: Path
) -> None:
    bound = {} if max_retries is None else {"max_retries": max_retries}
    _, output, config = _job(tmp_path, model_cache, **bound)
    log = tmp_path / "crashes.log"
    start = time.monotonic()
    result = run_cli("run", str(config), "--no-progress", env=_crash_env(where, log), timeout=600)
    seconds = time.monotonic() - start
    print(f"{where}: stopped after {seconds:.1f} s, {len(log.read_text().splitlines())} crashes")

    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.rstrip().splitlines()[-1]  # our error, last: no worker output after it
    assert error.startswith("error: ")
    assert message in error
    assert "resources.max_retries" in error and "the same command resumes" in error
    if where != "encode":
        assert "(pid " in error and "SIGSEGV" in error
    assert "Traceback" not in result.stderr
    assert "ray_remote_args" not in result.stderr  # Ray's deprecation warning stays off the console
    crashes = log.read_text().splitlines()
    limit = 1 + (2 if max_retries is None else max_retries)
    if where == "encode":  # each of the job's two encode tasks may crash before the first gives up
        assert limit <= len(crashes) <= 2 * limit
    else:  # one actor, restarted `max_retries` times
        assert len(crashes) == limit
    assert not (output / "stats.json").exists()


def test_a_one_off_crash_is_retried_and_the_job_completes(tmp_path: Path, model_cache: Path) -> None:
    """The actor dies in its first batch; Ray restarts it (reloading the model) and retries the batch."""
    manifest, output, config = _job(tmp_path, model_cache)
    log = tmp_path / "crashes.log"
    env = _crash_env("generate", log, SDXL_BATCH_TEST_CRASH_ONCE=str(tmp_path / "crashed"))
    result = run_cli("run", str(config), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(log.read_text().splitlines()) == 1
    assert json.loads((output / "stats.json").read_text())["rows"] == 8
    assert run_cli("verify", str(output), "--manifest", str(manifest)).returncode == 0

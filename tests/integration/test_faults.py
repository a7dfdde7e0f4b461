"""Fault tests with real processes: a killed driver, a killed generator actor, a flaky object
store, and writes that fail for good. After each, `sdxl-batch verify` must find every manifest
id exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.helpers import CLI, REPO, prompt_rows, run_cli, write_config, write_manifest
from tests.integration.faults import FaultyS3Proxy

pytestmark = pytest.mark.integration
ROWS = 160
ROWS_PER_PART = 8


def _config(
    tmp_path: Path, model_cache: Path, manifest: str, output: str, *, size: int = 128, in_process: bool | str = "auto"
) -> Path:
    """128 px by default: slow enough that a test acts while the job runs (kills, denied writes).
    A job this small runs in the driver's process unless `in_process` is false."""
    return write_config(
        tmp_path / "job.yaml",
        manifest=manifest,
        output=output,
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": size, "height": size},
        write={"rows_per_part": ROWS_PER_PART},
        resources={"in_process": in_process},
    )


def _start(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.Popen(
        [*CLI, "run", str(config), "--no-progress"], cwd=REPO, env=full_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"job ended early: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for progress"
        time.sleep(0.1)


def _verify(output: str, manifest: str, env: dict[str, str] | None = None) -> str:
    result = run_cli("verify", output, "--manifest", manifest, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _parts(folder: Path) -> int:
    return len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0


def test_driver_killed_then_rerun_resumes_exactly_once(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(ROWS))
    output = tmp_path / "out"
    config = _config(tmp_path, model_cache, str(manifest), str(output))
    process = _start(config)
    _wait_for(lambda: _parts(output / "metadata") >= 3, process)
    os.kill(process.pid, signal.SIGKILL)  # the driver, with no chance to clean up
    # ... and the embedded Ray it started (its workers sit in their own process groups but in the
    # driver's session), as when the node is preempted: nothing may finish after the kill.
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    process.wait()
    committed = _parts(output / "metadata") * ROWS_PER_PART
    report = run_cli("verify", str(output)).stdout
    orphans = int(report.split("orphans:")[1].split("(")[1].split()[0])  # "N (I images, ..."
    # The killed driver's lease is left behind; its process is gone from this host, so it is stale.
    assert "is gone from this host); the next writer takes it over" in report, report

    rerun = run_cli("run", str(config), "--no-progress")  # a plain rerun: no flag needed
    assert rerun.returncode == 0, rerun.stderr
    assert "took over the lease on" in rerun.stderr and f"its process {process.pid} is gone" in rerun.stderr
    assert f"Resumed: {committed} of {ROWS} rows" in rerun.stdout
    assert f"Rendered {ROWS - committed} images" in rerun.stdout  # nothing committed is rendered again
    # Work lost to the kill: only uncommitted parts (images written, metadata not yet).
    assert orphans <= 4 * ROWS_PER_PART
    assert "orphans:          0 (" in _verify(str(output), str(manifest))  # the rerun's end removed them


def test_killed_actor_is_restarted_and_the_job_finishes(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(ROWS))
    output = tmp_path / "out"
    process = _start(_config(tmp_path, model_cache, str(manifest), str(output), in_process=False))
    _wait_for(lambda: _parts(output / "metadata") >= 2, process)
    pids = _generator_processes(process.pid)
    assert pids, "no generator actor process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    _verify(str(output), str(manifest))


def _generator_processes(driver: int) -> list[int]:
    """The generator actors of the job whose driver is `driver`: its embedded Ray's workers are
    its descendants (raylet, then workers). Only this job's: other tests' Ray may run beside it."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != driver:
            ancestor = parents.get(ancestor)
        if ancestor == driver:
            try:
                if b"MapBatches(GenerateImages)" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
    return found


def _s3_job(
    tmp_path: Path, model_cache: Path, bucket: str, endpoint: str, *, rows: int = ROWS // 2, size: int = 128
) -> tuple[s3fs.S3FileSystem, str, str, Path]:
    """A manifest in the bucket and a job config writing next to it; talks to moto directly."""
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(prompt_rows(rows)), buffer)
    fs.pipe(f"{bucket}/manifest/m.parquet", buffer.getvalue().to_pybytes())
    manifest, output = f"s3://{bucket}/manifest/m.parquet", f"s3://{bucket}/out"
    return fs, manifest, output, _config(tmp_path, model_cache, manifest, output, size=size)


def test_flaky_object_store_is_retried(
    tmp_path: Path, model_cache: Path, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    # Nothing acts while it runs: fewer, smaller images still make some 60 requests, every 7th failing.
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    _, manifest, output, config = _s3_job(tmp_path, model_cache, s3_bucket, endpoint, rows=ROWS // 4, size=64)
    with FaultyS3Proxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        proxy.mode, proxy.fail_every, proxy.drop_every = "flaky", 7, 11
        env = s3_env | {"AWS_ENDPOINT_URL": proxy.url}
        result = run_cli("run", str(config), "--no-progress", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert proxy.failed > 0 and proxy.dropped > 0
    _verify(output, manifest, env=s3_env)


def test_permanent_write_failure_stops_cleanly_and_resumes(
    tmp_path: Path, model_cache: Path, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    fs, manifest, output, config = _s3_job(tmp_path, model_cache, s3_bucket, s3_env["AWS_ENDPOINT_URL"])
    with FaultyS3Proxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        env = s3_env | {"AWS_ENDPOINT_URL": proxy.url}
        process = _start(config, env)
        _wait_for(lambda: len(fs.glob(f"{s3_bucket}/out/metadata/part-*")) >= 1, process)
        proxy.mode = "deny_writes"
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr[-3000:]
        assert "cannot write to the output" in stderr and "rerun the same command" in stderr
        assert "Traceback" not in stderr
        fs.invalidate_cache()
        committed = len(fs.glob(f"{s3_bucket}/out/metadata/part-*")) * ROWS_PER_PART
        proxy.mode = "ok"
        rerun = run_cli("run", str(config), "--no-progress", env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"Resumed: {committed} of {ROWS // 2} rows" in rerun.stdout
    _verify(output, manifest, env=s3_env)

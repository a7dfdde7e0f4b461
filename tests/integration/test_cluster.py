"""A real multi-node Ray cluster on loopback (a head and two workers with one logical GPU each,
all started with `ray start`, token auth on): `run` joining it, `submit` through the Ray Jobs
API, one actor per GPU on both workers, fractional GPUs, `jobs list|status|logs|stop`, and the
job's Ray metrics as Prometheus scrapes them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.run.telemetry import METRICS
from tests.helpers import REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest
from tests.integration.conftest import RayCluster, loopback_cluster

pytestmark = pytest.mark.integration


def _gpu_nodes(cluster: RayCluster) -> tuple[set[str], set[str]]:
    """(all node ids, ids of the nodes with a GPU), asked from the cluster itself."""
    script = (
        f"import ray; ray.init(address={cluster.address!r}); "
        "print(' '.join(n['NodeID'] + ('+' if n['Resources'].get('GPU') else '') for n in ray.nodes() if n['Alive']))"
    )
    env = {**os.environ, **cluster.env}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    return {i.rstrip("+") for i in ids}, {i.rstrip("+") for i in ids if i.endswith("+")}


def _generator_actors(cluster: RayCluster, ray_job_id: str) -> list[dict[str, str]]:
    """The generator actors a Ray job started (alive or since ended), with the node each ran on,
    asked from the cluster's state API: Ray Data names the actor class after the map function."""
    script = (
        "import json; from ray.util.state import list_actors; "
        f"actors = list_actors(address={cluster.dashboard!r}, filters=[('job_id', '=', {ray_job_id!r})], "
        "limit=1000, detail=True, raise_on_missing_output=False); "
        "print(json.dumps([{'id': a.actor_id, 'class': a.class_name, 'state': a.state, 'node': a.node_id} "
        "for a in actors]))"
    )
    env = {**os.environ, **cluster.env}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    return [a for a in json.loads(result.stdout.splitlines()[-1]) if "GenerateImages" in a["class"]]


def _job(tmp_path: Path, model_cache: Path, rows: int, **resources: object) -> Path:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(rows))
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 2, "width": 64, "height": 64},
        write={"rows_per_part": 2},
        resources=resources,
    )


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {
        row["id"]: np.asarray(Image.open(output / row["image_path"])).astype(np.int16)
        for row in read_metadata(str(output)).to_pylist()
    }


def _scrape(url: str) -> dict[str, float]:
    """Our series in Ray's Prometheus export, summed over Ray's own labels: {name{our labels}: value}."""
    series: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        match = re.match(r"(ray_sdxl_batch_\w+)\{(.*)\} (\S+)$", line)
        if match:
            ours = sorted(
                p
                for p in re.findall(r'(\w+)="([^"]*)"', match.group(2))
                if p[0] in {"sdxl_job", "model", "stage", "le"}
            )
            key = match.group(1) + "{" + ",".join(f"{k}={v}" for k, v in ours) + "}"
            series[key] = series.get(key, 0.0) + float(match.group(3))
    return series


def test_run_joins_the_cluster_in_ray_address(tmp_path: Path, model_cache: Path, ray_cluster: RayCluster) -> None:
    config = _job(tmp_path, model_cache, 4)
    result = run_cli("run", str(config), "--no-progress", env={"RAY_ADDRESS": ray_cluster.address, **ray_cluster.env})
    assert result.returncode == 0, result.stderr
    nodes, gpu_nodes = _gpu_nodes(ray_cluster)
    used = set(read_metadata(str(tmp_path / "out")).column("node").to_pylist())
    assert used and used <= gpu_nodes < nodes  # generator actors only where the GPUs are
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows"] == 4 and stats["gpus_per_actor"] == 1 and stats["actors"] == 2

    # The job's Ray metrics, as Prometheus scrapes them from the nodes (pushed every second here).
    generated = "ray_sdxl_batch_images_generated_total{model=tiny,sdxl_job=out}"
    deadline, series = time.monotonic() + 30, dict[str, float]()
    while time.monotonic() < deadline and series.get(generated) != 4:
        time.sleep(1)
        series = {}
        for url in ray_cluster.metrics_urls:
            for key, value in _scrape(url).items():
                series[key] = series.get(key, 0.0) + value
    assert series.get(generated) == 4, sorted(series)
    assert series["ray_sdxl_batch_images_committed_total{model=tiny,sdxl_job=out}"] == 4
    calls = series["ray_sdxl_batch_batch_latency_seconds_count{model=tiny,sdxl_job=out}"]
    every_call = series["ray_sdxl_batch_batch_latency_seconds_bucket{le=+Inf,model=tiny,sdxl_job=out}"]
    assert calls >= 2 and every_call == calls
    stages = {re.search(r"stage=(\w+)", k).group(1) for k in series if "stage_seconds_total" in k}  # type: ignore[union-attr]
    assert {"text_encode", "denoise", "vae_decode", "to_host", "encode", "upload"} <= stages
    # Every metric the Grafana dashboard queries is one we define; all but the GPU-only gauges
    # (and OOM retries, counted only when they happen) were exported by this CPU job.
    dashboard = (REPO / "infra" / "grafana" / "sdxl-batch.json").read_text()
    queried = set(re.findall(r"ray_(sdxl_batch_\w+?)(?:_total|_bucket|_count|_sum)?\b", dashboard))
    assert queried == set(METRICS)
    exported = {re.sub(r"^ray_|(_total|_bucket|_count|_sum)?\{.*$", "", k) for k in series}
    assert queried - exported == {
        "sdxl_batch_gpu_utilization_percent",
        "sdxl_batch_gpu_memory_peak_bytes",
        "sdxl_batch_oom_retries",
    }


def test_submit_places_one_actor_per_gpu_on_both_workers(
    tmp_path: Path, model_cache: Path, ray_cluster: RayCluster
) -> None:
    config = _job(tmp_path, model_cache, 8)
    # The reference: the same job on one node (embedded Ray, one CPU actor).
    single = tmp_path / "single"
    result = run_cli("run", str(config), "--no-progress", "--output", str(single), "--set", "resources.actors=1")
    assert result.returncode == 0, result.stderr

    address = ["--address", ray_cluster.dashboard]
    result = run_cli("submit", str(config), *address, "--wait", env=ray_cluster.env)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"Submitted (\S+) to", result.stdout).group(1)  # type: ignore[union-attr]
    assert "Rendered 8 images" in result.stdout and f"{job_id}: SUCCEEDED" in result.stdout

    table = read_metadata(str(tmp_path / "out"))
    _, gpu_nodes = _gpu_nodes(ray_cluster)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["actors"] == 2 and stats["gpus_per_actor"] == 1  # resolved from the cluster's 2 GPUs
    # One generator actor per GPU, on both GPU workers (asked from the cluster, not from our records).
    started = _generator_actors(ray_cluster, next(iter(stats["per_actor"]))[-8:])
    assert len(started) == 2 and {a["node"] for a in started} == gpu_nodes and len(gpu_nodes) == 2, started
    # Every row was rendered by one of them. How the 4 slices of 8 rows divide between the two is
    # Ray Data's dispatch timing, not placement: measured in a fresh cluster's first job, the
    # slices reached the pool one after another, each as the previous call ended, and the pool's
    # least-busy pick broke its tie the same way every time: one actor took all four.
    assert set(table.column("actor").to_pylist()) <= {a["id"] for a in started}
    assert set(table.column("node").to_pylist()) <= gpu_nodes
    assert sum(g["rows"] for g in stats["per_gpu"].values()) == 8
    reference, submitted = _pixels(single), _pixels(tmp_path / "out")
    assert reference.keys() == submitted.keys() and len(reference) == 8
    for row_id, pixels in reference.items():
        assert np.abs(pixels - submitted[row_id]).max() <= 2, row_id
    assert run_cli("verify", str(tmp_path / "out"), "--manifest", str(tmp_path / "m.parquet")).returncode == 0

    listed = run_cli("jobs", "list", *address, env=ray_cluster.env)
    assert listed.returncode == 0 and re.search(rf"{job_id}\s+SUCCEEDED", listed.stdout), listed.stdout
    status = run_cli("jobs", "status", job_id, *address, env=ray_cluster.env)
    assert "status     SUCCEEDED" in status.stdout and "jobs/generate.py submitted.yaml" in status.stdout
    logs = run_cli("jobs", "logs", job_id, *address, env=ray_cluster.env)
    assert "Rendered 8 images" in logs.stdout
    missing = run_cli("jobs", "status", "no-such-job", *address, env=ray_cluster.env)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_fractional_gpus_and_an_autoscaling_range(tmp_path: Path, model_cache: Path, ray_cluster: RayCluster) -> None:
    # Two actors share each logical GPU; the pool may grow from 2 to 4 actors.
    config = _job(tmp_path, model_cache, 8, gpus_per_actor=0.5, cpus_per_actor=0.25, actors=[2, 4])
    result = run_cli("submit", str(config), "--address", ray_cluster.dashboard, "--wait", env=ray_cluster.env)
    assert result.returncode == 0, result.stdout + result.stderr
    table = read_metadata(str(tmp_path / "out"))
    assert table.num_rows == 8
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["gpus_per_actor"] == 0.5 and stats["actors"] == [2, 4]
    # Which actors got rows depends on which finished loading first (one can take all eight),
    # so the pool's size is asked from the cluster: it started at least the minimum, at most the maximum.
    assert 1 <= len(stats["per_actor"]) <= 4
    ray_job_id = next(iter(stats["per_actor"]))[-8:]  # an actor id ends with its job's id
    started = _generator_actors(ray_cluster, ray_job_id)
    assert 2 <= len(started) <= 4, started
    assert set(stats["per_actor"]) <= {a["id"] for a in started}


def test_submit_checks_first_and_the_token_is_required(
    tmp_path: Path, model_cache: Path, ray_cluster: RayCluster
) -> None:
    address = ["--address", ray_cluster.dashboard]
    before = run_cli("jobs", "list", *address, env=ray_cluster.env).stdout.count("sdxl-batch-")
    rows = prompt_rows(3)
    rows[1]["seed"] = -5
    write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(
        tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
    )  # fmt: skip
    bad = run_cli("submit", str(config), *address, env=ray_cluster.env)
    assert bad.returncode == 1 and "row 1" in bad.stderr and "'seed'" in bad.stderr
    relative = run_cli("submit", str(config), *address, "--output", "out", env=ray_cluster.env)
    assert relative.returncode == 2 and "relative local path" in relative.stderr
    assert run_cli("jobs", "list", *address, env=ray_cluster.env).stdout.count("sdxl-batch-") == before

    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    refused = run_cli("jobs", "list", *address, env={**ray_cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert refused.returncode == 2 and "refused the authentication token" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_jobs_stop(tmp_path: Path, model_cache: Path, ray_cluster: RayCluster) -> None:
    config = _job(tmp_path, model_cache, 64)
    address = ["--address", ray_cluster.dashboard]
    submitted = run_cli("submit", str(config), *address, env=ray_cluster.env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted (\S+) to", submitted.stdout).group(1)  # type: ignore[union-attr]
    stopped = run_cli("jobs", "stop", job_id, *address, env=ray_cluster.env)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and "STOPPED" not in status:
        time.sleep(1)
        status = run_cli("jobs", "status", job_id, *address, env=ray_cluster.env).stdout
    assert "status     STOPPED" in status


def test_submit_right_after_the_head_starts(tmp_path: Path, model_cache: Path) -> None:
    """`ray start --head` returns before the head's dashboard and job agent answer ("No available
    agent to submit job, please try again later"): submit retries, saying so, until they do."""
    config = _job(tmp_path, model_cache, 2)
    with loopback_cluster(tmp_path / "fresh", workers=0) as cluster:
        submitted = run_cli("submit", str(config), "--address", cluster.dashboard, env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr
    assert "Submitted sdxl-batch-" in submitted.stdout
    retries = [line for line in submitted.stderr.splitlines() if "is still starting" in line]
    assert all("retrying in" in line for line in retries)

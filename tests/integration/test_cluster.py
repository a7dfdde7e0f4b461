"""`sdxl-batch run` joins the cluster named by RAY_ADDRESS instead of starting its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.telemetry import METRICS
from tests.helpers import REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest
from tests.integration.conftest import RayHead

pytestmark = pytest.mark.integration


def _node_ids(address: str) -> set[str]:
    script = f"import ray; ray.init(address={address!r}); print(' '.join(n['NodeID'] for n in ray.nodes()))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


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


def test_run_joins_the_cluster_in_ray_address(tmp_path: Path, model_cache: Path, ray_head: RayHead) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(4))
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
    )
    assert ray_head.startswith("127.0.0.1:")
    result = run_cli("run", str(config), "--no-progress", env={"RAY_ADDRESS": ray_head})
    assert result.returncode == 0, result.stderr
    nodes = set(read_metadata(str(tmp_path / "out")).column("node").to_pylist())
    assert nodes and nodes <= _node_ids(ray_head)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows"] == 4

    # The job's Ray metrics, as Prometheus scrapes them from the node (pushed every second here).
    generated = "ray_sdxl_batch_images_generated_total{model=tiny,sdxl_job=out}"
    deadline, series = time.monotonic() + 30, {}
    while time.monotonic() < deadline and series.get(generated) != 4:
        time.sleep(1)
        series = _scrape(ray_head.metrics_url)
    assert series.get(generated) == 4, sorted(series)
    assert series["ray_sdxl_batch_images_committed_total{model=tiny,sdxl_job=out}"] == 4
    calls = series["ray_sdxl_batch_batch_latency_seconds_count{model=tiny,sdxl_job=out}"]
    assert (
        calls >= 1 and series["ray_sdxl_batch_batch_latency_seconds_bucket{le=+Inf,model=tiny,sdxl_job=out}"] == calls
    )
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

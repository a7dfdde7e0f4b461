"""`sdxl-batch run` joins the cluster named by RAY_ADDRESS instead of starting its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration


def _node_ids(address: str) -> set[str]:
    script = f"import ray; ray.init(address={address!r}); print(' '.join(n['NodeID'] for n in ray.nodes()))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_run_joins_the_cluster_in_ray_address(tmp_path: Path, model_cache: Path, ray_head: str) -> None:
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

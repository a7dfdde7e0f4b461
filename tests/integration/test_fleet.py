"""Tuning a cluster of two GPU types at once, then one job on that mixed fleet, on the shared
loopback cluster (two worker nodes, each with a logical GPU of its own type: GPU_A and GPU_B)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, read_metadata, run_cli, write_config, write_manifest
from tests.integration.conftest import GPU_TYPES, RayCluster, inject_env

pytestmark = pytest.mark.integration


def _cluster_state(cluster: RayCluster) -> tuple[dict[str, set[str]], int]:
    """The cluster's nodes per GPU type, and how many named actors (Ray Data's cluster-wide ones:
    ours have no names) have died, asked from Ray's state API."""
    script = (
        "import json; from ray.util.state import list_actors, list_nodes; "
        f"kw = dict(address={cluster.dashboard!r}, raise_on_missing_output=False); "
        "nodes = list_nodes(detail=True, **kw); "
        "dead = [a for a in list_actors(filters=[('state', '=', 'DEAD')], limit=10000, **kw) if a.name]; "
        "print(json.dumps([[[n.node_id, n.resources_total] for n in nodes if n.state == 'ALIVE'], len(dead)]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, **cluster.env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    nodes, dead = json.loads(result.stdout.splitlines()[-1])
    found: dict[str, set[str]] = {}
    for node, resources in nodes:
        for key in resources:
            if key.startswith("accelerator_type:"):
                found.setdefault(key.split(":", 1)[1], set()).add(node)
    return found, dead


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]


@pytest.fixture
def job(tmp_path: Path, model_cache: Path) -> Path:
    rows = [
        {"id": f"row-{i:02d}", "prompt": f"a lighthouse at dusk, number {i}", "seed": 100 + i,
         "width": 64 if i < 16 else 72, "height": 64}
        for i in range(24)
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "fleet-out"),
        model={"preset": "tiny", "cache_dir": str(model_cache), "dtype": "float32"},
        write={"rows_per_part": 4},
    )


def test_tune_both_types_at_once_then_run_the_fleet(tmp_path: Path, job: Path, ray_cluster: RayCluster) -> None:
    work, cache = tmp_path / "tune", tmp_path / "cache"
    flags = [
        "tune", str(job), "--address", ray_cluster.address, "--dtypes", "fp32", "--compile", "off",
        "--attention", "sdpa,eager", "--fuse-qkv", "off", "--channels-last", "off", "--actors-per-gpu", "1",
        "--batch-sizes", "2,4", "--reference", "fp32", "--search", "grid", "--sample", "8",
        "--prices", "GPU_A=1.0,GPU_B=2.5", "--work-dir", str(work), "--cache-dir", str(cache), "--no-progress",
    ]  # fmt: skip
    # The actors "run out of memory" above 2 images per call; `attention: eager` "corrupts" the pixels.
    env = {**ray_cluster.env, **inject_env(oom_above="2", corrupt="attention=eager")}
    _, dead_before = _cluster_state(ray_cluster)
    result = run_cli(*flags, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    record = json.loads((work / "tune.json").read_text())

    # Both types' loads ran at the same time, each on a node of its type (Ray's state API says which).
    loads = [load for load in record["loads"] if not load["cached"]]
    nodes, dead_after = _cluster_state(ray_cluster)
    # Ray Data's cluster-wide actors were started outside the trials' placement groups: none died with a trial.
    assert dead_after == dead_before
    assert {load["accelerator_type"] for load in loads} == set(GPU_TYPES) and len(loads) == 4
    for load in loads:
        assert load["node_id"] in nodes[load["accelerator_type"]], load
    a = [load for load in loads if load["accelerator_type"] == "GPU_A"]
    b = [load for load in loads if load["accelerator_type"] == "GPU_B"]
    assert any(_overlap(x, y) for x in a for y in b), [(x["started_at"], x["ended_at"]) for x in loads]
    assert record["loads_per_gpu"] and all(n == 2 for n in record["loads_per_gpu"].values())  # 2 load settings

    # The memory probe: batch 4 ran out of memory on each type's first load (infeasible, recorded);
    # the type's next load with that precision starts below it; 2 was measured on every load.
    trials = record["trials"]
    statuses = Counter((t["settings"]["batch_size"], t["status"]) for t in trials)
    assert statuses == {(4, "infeasible: out of memory"): 2, (2, "ok"): 4}, statuses
    # The quality gate: the corrupting setting is measured, shown with its difference, and never chosen.
    eager = [t for t in trials if t["settings"]["attention"] == "eager" and t["status"] == "ok"]
    assert eager and all(t["quality_passed"] is False and "rejected by the quality gate" in t["note"] for t in eager)
    assert all(t["quality"] is not None and t["quality"] < 10 for t in eager)
    for name in GPU_TYPES:
        assert record["best"][name]["settings"]["attention"] == "sdpa" and record["best"][name]["price"] is not None
    assert record["fleet"]["pixels"] == {"dtype": "float32", "attention": "sdpa", "compile": False, "fuse_qkv": False}
    assert "GPU_A: 1 GPU(s)" in result.stdout and "best (" in result.stdout
    assert (work / "tune.html").read_text().count("<svg") == 2

    best = yaml.safe_load((work / "best.yaml").read_text())
    assert set(best["fleet"]) == set(GPU_TYPES) and best["model"]["attention"] == "sdpa"
    assert best["manifest"] == str(tmp_path / "m.parquet") and "torch_threads" not in best.get("resources", {})

    # A rerun measures only what is new: everything is in the cache.
    again = run_cli(*flags, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((work / "tune.json").read_text())
    assert rerun["cache"]["hits"] == 4 and all(load["cached"] for load in rerun["loads"])
    assert "0 run, 4 from the cache" in again.stdout and rerun["loads_per_gpu"] == {}

    # One job on the fleet, at each type's own batch size; work goes to whichever actor is free
    # (Ray Data waits for both actors here, so that a slow load cannot leave one type without work).
    fleet = ["--set=fleet.GPU_A.batch_size=1", "--set=fleet.GPU_B.batch_size=3"]
    slow = {**ray_cluster.env, **inject_env(slow_generate="0.3"), "RAY_ADDRESS": ray_cluster.address,
            "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}  # fmt: skip
    run = run_cli("run", str(work / "best.yaml"), *fleet, "--no-progress", env=slow, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = read_metadata(str(tmp_path / "fleet-out"))
    by_type: dict[str, set[int]] = {}
    for row in table.select(["accelerator_type", "render_batch_size"]).to_pylist():
        by_type.setdefault(row["accelerator_type"], set()).add(row["render_batch_size"])
    assert set(by_type) == set(GPU_TYPES) and by_type["GPU_A"] == {1} and max(by_type["GPU_B"]) == 3, by_type
    assert set(table.column("dtype").to_pylist()) == {"float32"}
    assert set(table.column("vae").to_pylist()) == {"tiny/vae"}
    assert set(table.column("attention").to_pylist()) == {"sdpa"}
    stats = json.loads((tmp_path / "fleet-out" / "stats.json").read_text())
    assert set(stats["per_accelerator_type"]) == set(GPU_TYPES) and stats["fleet"]["GPU_B"]["batch_size"] == 3
    verify = run_cli("verify", str(tmp_path / "fleet-out"), "--manifest", str(tmp_path / "m.parquet"))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr

    # Nothing left to render: estimate says so, without starting Ray.
    nothing = run_cli("estimate", str(work / "best.yaml"), "--from", str(work / "tune.json"))
    assert nothing.returncode == 0 and "nothing to estimate" in nothing.stdout, nothing.stderr

    # A resume that would render in another precision stops, naming it.
    other = run_cli("run", str(work / "best.yaml"), "--set", "model.dtype=bfloat16", "--no-progress", env=slow)
    assert other.returncode == 2 and "model.dtype: 'float32' -> 'bfloat16'" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr

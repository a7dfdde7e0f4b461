"""Losing GPU nodes mid-job, as spot preemption does: a worker node's whole process group (its
raylet and every worker process on it) killed while parts are committing, on a loopback cluster
of our own (head without GPUs + two workers with one logical GPU each).

One node lost: the job goes on with the actor left. Every GPU node lost: it cannot go on, and
stops within a bounded time (`resources.wait_for_nodes_s`) with our error. A node joins, the same
command finishes the job there: every row exactly once, and no row committed before a loss is
rendered again.

Before: the lost actor's batch used up its retries in the seconds before Ray noticed the node was
gone ("The actor is temporarily unavailable", Ray's ActorUnavailableError), and the job died with
a traceback 5 s after the loss, though a node with a GPU was left; with no GPU node left, Ray
would have waited for one for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
import pytest

from tests.helpers import CLI, REPO, prompt_rows, read_metadata, run_cli, write_config, write_manifest
from tests.integration.conftest import loopback_cluster, start_worker

pytestmark = pytest.mark.integration

INJECT = Path(__file__).with_name("inject")
ROWS = 48  # 4 read slices of 12 rows: two per actor
WAIT_FOR_NODES_S = 3
# The head notices a lost node after 5 failed health checks a second apart (Ray's defaults: every
# 3 s, after a 5 s delay), each with 5 s to answer, so that a busy machine loses no live node.
QUICK_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
}
# The nodes that will be lost render slowly (0.4 s per batch of 2), so a loss finds work in flight.
SLOW_NODE = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
    "SDXL_BATCH_TEST_SLOW_GENERATE": "0.4",
}

T = TypeVar("T")


def _node_id(node: subprocess.Popen[bytes]) -> str:
    """The Ray node id of a `ray start --block` process: its raylet's, found in its process group."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getpgid(int(proc.name)) != node.pid:
                continue
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        for arg in args:
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
    raise AssertionError(f"no raylet in process group {node.pid}")


def _lose(node: subprocess.Popen[bytes]) -> float:
    """Kill the node's whole process group, as a preempted machine goes; returns when (epoch)."""
    os.killpg(node.pid, signal.SIGKILL)
    node.wait(timeout=10)
    return time.time()


def _committed(output: Path) -> dict[str, int]:
    """The committed metadata parts: name -> mtime (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (output / "metadata").glob("part-*.parquet")}


def _calls(output: Path, part: str) -> list[list[float]]:
    """A part's model calls, from its stats record: (images, seconds, when it ended) each."""
    record = json.loads((output / "stats" / part.replace(".parquet", ".json")).read_text())
    calls: list[list[float]] = record["calls"]
    return calls


def _rendered_after(output: Path, parts: set[str], when: float) -> str | None:
    """A committed part, not in `parts`, whose last model call ended after `when` (epoch)."""
    for name in set(_committed(output)) - parts:
        calls = _calls(output, name)
        if calls and max(call[2] for call in calls) > when:
            return name
    return None


def _wait_for(condition: Callable[[], T | None], job: subprocess.Popen[str], what: str, timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before {what}"
        time.sleep(0.1)
    job.kill()
    raise AssertionError(f"no {what} after {timeout} s")


def _ids(output: Path, parts: set[str]) -> set[str]:
    return {i for name in parts for i in pq.read_table(output / "metadata" / name, columns=["id"])["id"].to_pylist()}


def _job(tmp_path: Path, model_cache: Path) -> tuple[Path, Path, Path]:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(ROWS))
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 2, "width": 64, "height": 64},
        write={"rows_per_part": 2},
        resources={"wait_for_nodes_s": WAIT_FOR_NODES_S},  # actors: one per GPU, 2
    )
    return manifest, output, config


def _start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """`sdxl-batch run` in the background, its output into `log`.out and .err."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(
            [*CLI, "run", str(config), "--no-progress"], cwd=REPO, env={**os.environ, **env}, text=True,
            stdout=out, stderr=err,
        )  # fmt: skip


def test_losing_gpu_nodes_mid_job(tmp_path: Path, model_cache: Path) -> None:
    manifest, output, config = _job(tmp_path, model_cache)
    with loopback_cluster(
        tmp_path / "cluster", dashboard=False, head_env=QUICK_HEALTH_CHECKS, worker_env=SLOW_NODE
    ) as cluster:
        first, second = cluster.processes[1:3]
        lost = {_node_id(first), _node_id(second)}
        env = cluster.env | {"RAY_ADDRESS": cluster.address}
        # Both actors take work: Ray Data holds it until both are up (else the first up may take all).
        job = _start(config, env | {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}, tmp_path / "job")
        try:
            # 1. One GPU node lost while parts commit: the job goes on with the actor left.
            started = time.monotonic()
            before_first = _wait_for(lambda: _committed(output), job, "a committed part", timeout=300)
            first_lost_at, first_loss = _lose(first), time.monotonic() - started
            went_on = _wait_for(
                lambda: _rendered_after(output, set(before_first), first_lost_at), job, "a part rendered after the loss"
            )
            assert pq.read_table(output / "metadata" / went_on)["node"].to_pylist()[0] == _node_id(second)
            # 2. The other one lost too: nothing can run a generator actor, the job stops within the bound.
            before_second = _committed(output)
            rendered = {name: _calls(output, name) for name in before_second}
            _lose(second)
            second_lost_at = time.monotonic()
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
        stopped_after = time.monotonic() - second_lost_at
        stderr = (tmp_path / "job.err").read_text()
        assert job.returncode == 2, stderr[-5000:]
        error = stderr.rstrip().splitlines()[-1]
        assert error.startswith("error: no node of the cluster can run a generator actor (1 GPU and 1 CPU) for ")
        assert f"the 2 that could are gone ({', '.join(sorted(n[:12] for n in lost))})" in error
        assert "resources.wait_for_nodes_s" in error and "rerun the same command" in error
        assert "Traceback" not in stderr
        # Ray's health checks (~5 s here), our wait and one poll; a hang would run into the timeout above.
        assert stopped_after < 5 + WAIT_FOR_NODES_S + 20
        committed = _committed(output)
        # No part committed before the first loss is written again. One committed just before the
        # second may be (a write task that ran on that node, retried: the same rows and images),
        # but none is rendered again: its stats record keeps the model calls it was rendered by.
        assert before_first.items() <= committed.items()
        assert {name: _calls(output, name) for name in before_second} == rendered
        done = _ids(output, set(committed))
        assert 0 < len(done) < ROWS

        # 3. A node joins; the same command renders the rest there, once.
        third = start_worker(cluster, "worker-3")
        rerun_at = time.monotonic()
        resumed = run_cli("run", str(config), "--no-progress", env=env)
        print(
            f"first loss {first_loss:.1f} s into the job; the job "
            f"stopped {stopped_after:.1f} s after the second, with {len(done)} of {ROWS} rows committed; the rerun "
            f"took {time.monotonic() - rerun_at:.1f} s"
        )
        assert resumed.returncode == 0, resumed.stderr
        assert f"Resumed: {len(done)} of {ROWS} rows were already done" in resumed.stdout
        after = _committed(output)
        assert committed.items() <= after.items()  # the parts committed before the losses, untouched
        stats = json.loads((output / "stats.json").read_text())
        assert stats["rows_done_before"] == len(done) and stats["rows"] == ROWS - len(done)
        new = set(after) - set(committed)
        nodes = {n for name in new for n in pq.read_table(output / "metadata" / name)["node"].to_pylist()}
        assert nodes == {_node_id(third)} and not nodes & lost
        assert _ids(output, new) == {row["id"] for row in prompt_rows(ROWS)} - done
    table = read_metadata(str(output))
    assert sorted(table.column("id").to_pylist()) == sorted(row["id"] for row in prompt_rows(ROWS))
    verified = run_cli("verify", str(output), "--manifest", str(manifest))
    assert verified.returncode == 0 and "OK: every row exactly once" in verified.stdout, verified.stdout

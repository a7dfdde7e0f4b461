from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


# The loopback clusters' ports: below Linux's ephemeral range (32768-60999), from which every
# outgoing connection on the machine takes its local port, so a port found free cannot be taken
# by one of those before Ray binds it (seen with ports from bind(0): a worker's runtime-env agent
# failed with "Address already in use", its raylet went with it, and a job waited for its GPUs
# forever), and above Ray's worker ports (10002-19999). Each pytest-xdist worker, and any other
# process (a benchmark), draws from a slice of its own; none hands out a port twice.
_PORTS_START, _PORTS_PER_PROCESS = 20000, 1500
_handed_out: set[int] = set()


def _free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    slot = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = _PORTS_START + (slot % 8) * _PORTS_PER_PROCESS
    for _ in range(500):
        port = random.randrange(low, low + _PORTS_PER_PROCESS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))  # every address: Ray's agents listen on the machine's address too
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{low + _PORTS_PER_PROCESS - 1}")


@dataclass
class RayCluster:
    """A real Ray cluster on loopback: a head (dashboard, no GPUs) and worker nodes with one
    logical GPU each, all started with `ray start`, with their own auth token."""

    address: str  # GCS address, for RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:PORT, for the Jobs API
    metrics_urls: list[str]  # each node's Prometheus export
    env: dict[str, str]  # what a client needs: the token file, token auth on
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    folder: Path = Path()  # the nodes' logs
    node_env: dict[str, str] = field(default_factory=dict)  # what a node's processes start with


def _start_node(args: list[str], log: Path, env: dict[str, str], ready: str) -> subprocess.Popen[bytes]:
    # Every agent of the node on a port of its own: Ray's defaults (the dashboard agent's 52365)
    # are taken by whichever Ray on the machine starts first (the other lane's jobs), and a head
    # without its agent answers every job submission "No available agent to submit job".
    agents = [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *agents, *args],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while ready not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    if ready not in log.read_text():
        _stop(process)
        pytest.fail(f"ray node did not start ({' '.join(args)}):\n{log.read_text()[-3000:]}")
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Ray's own processes (GCS, raylet, workers) share the node's session; none may outlive the tests.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def start_worker(
    cluster: RayCluster,
    name: str,
    *,
    env: dict[str, str] | None = None,
    metrics_port: int | None = None,
    cpus: int = 1,
    gpus: int = 1,
    accelerator_type: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a worker node with `gpus` logical GPUs in `cluster` (`env`: extra variables for its
    processes; `accelerator_type`: the GPU type the node says it has, as Ray names a real GPU's).
    The node is its own process group, the raylet and every worker process it starts: killing the
    group is losing the node."""
    args = [f"--address={cluster.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"]
    args += [f"--metrics-export-port={metrics_port}"] if metrics_port else []
    args += [f"--resources={json.dumps({f'accelerator_type:{accelerator_type}': 1})}"] if accelerator_type else []
    process = _start_node(
        args, cluster.folder / f"{name}.log", {**cluster.node_env, **(env or {})}, "Ray runtime started"
    )
    cluster.processes.append(process)
    return process


@contextlib.contextmanager
def loopback_cluster(
    folder: Path,
    *,
    dashboard: bool = True,
    head_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
    worker_cpus: int = 1,
    worker_gpus: int = 1,
    worker_types: tuple[str | None, str | None] = (None, None),
    workers: int = 2,
) -> Iterator[RayCluster]:
    """Head (no GPUs) + 2 GPU workers (`--num-gpus 1` each: logical GPUs, the actors run on CPU),
    stopped on exit. `head_env`, `worker_env`: extra variables for those nodes' processes;
    `worker_cpus`, `worker_gpus`, `worker_types`: each worker's CPUs, GPUs and GPU type; `workers`:
    how many of the two to start (0: the head alone, yielded as soon as `ray start --head` returns)."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        # A multi-node cluster: Ray's single-node switch off (every node still binds to 127.0.0.1).
        **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        # As on a real node (or in the image), `python` is the environment's interpreter: job entrypoints call it.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        # Metrics are pushed to each node's exporter every second instead of every 10.
        "RAY_metrics_report_interval_ms": "1000",
        # The GPUs are logical: on a machine with CUDA the actors still run on the CPU. Ray leaves
        # CUDA_VISIBLE_DEVICES as it is, and its ids name no device (CUDA then sees none); Ray
        # only counts them against --num-gpus.
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
        "CUDA_VISIBLE_DEVICES": ",".join(["-1"] * 8),
    }  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port = _free_port(), _free_port()
    metrics = [_free_port() for _ in range(3)]
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    cluster = RayCluster(
        address=f"127.0.0.1:{port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        metrics_urls=[f"http://127.0.0.1:{m}/metrics" for m in metrics],
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
        folder=folder,
        node_env=env,
    )
    web = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    web = web if dashboard else ["--include-dashboard=false"]
    try:
        cluster.processes.append(_start_node(
            ["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", *web,
             f"--metrics-export-port={metrics[0]}", f"--temp-dir={ray_tmp}"],
            folder / "head.log", {**env, **(head_env or {})}, "Ray runtime started",
        ))  # fmt: skip
        for n, kind in list(zip((1, 2), worker_types, strict=True))[:workers]:
            start_worker(
                cluster, f"worker-{n}", env=worker_env, metrics_port=metrics[n], cpus=worker_cpus, gpus=worker_gpus,
                accelerator_type=kind,
            )  # fmt: skip
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            _stop(process)
        shutil.rmtree(ray_tmp, ignore_errors=True)


INJECT = Path(__file__).with_name("inject")
GPU_TYPES = ("GPU_A", "GPU_B")  # the shared cluster's two GPU types (names Ray's table does not know)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """The loopback cluster every cluster test shares (so none of them may stop a node): two
    worker nodes of 2 CPUs with a GPU of a type of their own each. Their processes can take the
    test faults (`inject/`), which a test turns on for its own job only (`inject_env`)."""
    with loopback_cluster(
        tmp_path_factory.mktemp("ray-cluster"), worker_cpus=2, worker_types=GPU_TYPES,
        worker_env={"PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")]))},
    ) as cluster:  # fmt: skip
        yield cluster


def inject_env(**faults: str) -> dict[str, str]:
    """A CLI's environment that turns on `inject/` faults (SDXL_BATCH_TEST_<NAME>=value) in every
    process of its Ray job on the shared cluster: Ray's runtime-env hook (`inject/forward_env.py`)
    adds them to the job's runtime env, so other jobs on the cluster run without them."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "RAY_RUNTIME_ENV_HOOK": "forward_env.hook",
        **{f"SDXL_BATCH_TEST_{name.upper()}": value for name, value in faults.items()},
    }

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RayHead(str):
    """The head's GCS address (a str), and the URL of its node's Prometheus metrics export."""

    metrics_url: str


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A real Ray head node started with `ray start` on loopback; yields its GCS address."""
    folder = tmp_path_factory.mktemp("ray-head")
    log = folder / "head.log"
    port, metrics_port = _free_port(), _free_port()
    # Metrics are pushed to the node's exporter every second instead of every 10.
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_metrics_report_interval_ms": "1000",
    }  # fmt: skip
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
             f"--metrics-export-port={metrics_port}", f"--temp-dir={folder / 'ray'}"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    address = RayHead(f"127.0.0.1:{port}")
    address.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    if "Ray runtime started" not in log.read_text():
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"ray head did not start:\n{log.read_text()[-3000:]}")
    yield address
    os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    # Ray's own processes (GCS, raylet, workers) share the session; none may outlive the test.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)

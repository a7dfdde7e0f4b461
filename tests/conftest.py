from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.models.tiny import TINY_VERSION, build_tiny_hub, build_tiny_pipeline
from pipeline.models.weights import materialize


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-session model cache holding the tiny pipeline, built once."""
    cache = tmp_path_factory.mktemp("model-cache")
    materialize(cache, f"tiny-v{TINY_VERSION}", build_tiny_pipeline)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    return model_cache / f"tiny-v{TINY_VERSION}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint: moto's server on loopback, spoken to over HTTP."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables pointing at the moto server (as a user would set them)."""
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY00001",
        "AWS_SECRET_ACCESS_KEY": "fake-secret-do-not-leak-0001",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name


_TINY_HUB = Path(tempfile.mkdtemp(prefix="sdxl-batch-tiny-hub-"))


@pytest.fixture(scope="session")
def tiny_hub() -> Path:
    """A Hugging Face cache holding tiny stand-ins under every preset's real repo and file names.

    The whole suite runs with HF_HUB_CACHE pointing here and HF_HUB_OFFLINE=1: nothing is
    downloaded, and the real names resolve through huggingface_hub's own cache lookup."""
    if not (_TINY_HUB / "models--ByteDance--SDXL-Lightning").exists():
        build_tiny_hub(_TINY_HUB)
    return _TINY_HUB


# Lanes (pyproject.toml's markers; `make test-unit` runs the tests that are none of these).
MODEL_FIXTURES = {"model_cache", "tiny_dir", "tiny_hub"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its lane from what it uses, so that no test file has to remember to:
    `model` (builds or loads a pipeline), `fuzz` (hypothesis), `integration` (real Ray, S3
    server, CLI processes); `gpu` tests are skipped without CUDA."""
    cuda: bool | None = None
    for item in items:
        function = getattr(item, "obj", None)
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.parent.name in ("models", "benchmarks"):
            item.add_marker(pytest.mark.model)
        if getattr(function, "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# The integration tests in two lanes of about equal time (measured on 2 cores), one per worker of
# `make test`: each lane runs its tests one after another. The cluster tests share one loopback
# cluster (a session fixture, so per worker): they stay in one lane.
INTEGRATION_LANE_B = frozenset({
    "test_faults.py", "test_compare.py", "test_crashes.py", "test_resume.py", "test_node_loss.py", "test_cli_local.py",
})  # fmt: skip


def integration_lane(nodeid: str) -> str | None:
    """`integration-a` or `integration-b` for an integration test, None for any other."""
    if not nodeid.startswith("tests/integration/"):
        return None
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "integration-b" if module in INTEGRATION_LANE_B else "integration-a"


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` (`-n auto --dist loadgroup`): the integration tests start Ray clusters, servers
    and CLI processes, so they run one after another in two lanes (`integration_lane`), which xdist
    hands out first (its scopes go largest first), one per worker; the other tests fill in as the
    workers' queues drain. Grouped by path here: xdist 3.8's own loadgroup tags a group by rewriting
    `item._nodeid`, which pytest 9 no longer reads, and would spread them over every worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInTwoLanes(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return integration_lane(nodeid) or nodeid

    return IntegrationInTwoLanes(config, log)


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports huggingface_hub, which reads these once.
    os.environ["HF_HUB_CACHE"] = str(_TINY_HUB)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Hugging Face datasets (tests/output/test_readers.py) caches what it loads: not in ~/.cache.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(_TINY_HUB / "datasets-cache")
    # Ray 2.60 authenticates with a token; every Ray the tests start (embedded by the CLI or with
    # `ray start`) listens on loopback only.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TINY_HUB, ignore_errors=True)

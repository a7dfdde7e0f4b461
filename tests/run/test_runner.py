from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.errors import ManifestError
from pipeline.run.runner import user_error


def test_user_errors_are_found_inside_ray_wrappers() -> None:
    cause = ManifestError("bad row", file="m.parquet", row=3, column="prompt")

    class RayTaskErrorLike(Exception):
        def __init__(self) -> None:
            super().__init__("task failed")
            self.cause = cause

    try:
        try:
            raise RayTaskErrorLike()
        except RayTaskErrorLike as inner:
            raise RuntimeError("dataset execution failed") from inner
    except RuntimeError as outer:
        assert user_error(outer) is cause
    assert user_error(RuntimeError("a bug")) is None


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379", "auto"])
def test_embedded_ray_never_attaches_to_a_stale_cluster(address: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from pipeline.run import session

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(session, "quiet_ray_data_console", lambda: None)
    session.init_ray(address)
    assert calls[0]["address"] == (address or "local")


def test_read_slices_are_one_model_call_until_jobs_are_large() -> None:
    from pipeline.core.config import JobConfig
    from pipeline.run.runner import read_slice_rows

    def config(batch: int, **more: Any) -> JobConfig:
        return JobConfig.model_validate({"manifest": "m", "output": "o", "generation": {"batch_size": batch}} | more)

    assert read_slice_rows(48, config(4)) == 4  # small jobs: one model call per slice
    assert read_slice_rows(10_000, config(8, resources={"actors": 8})) == 24  # 64 slices per actor: 3 calls
    assert read_slice_rows(1_000_000, config(8, resources={"actors": 8})) == 256  # at most 32 calls
    assert read_slice_rows(100_000_000, config(8, resources={"actors": [1, 1000]})) == 256
    # A mixed fleet: blocks of the largest batch size, each actor rendering them in calls of its own.
    assert read_slice_rows(96, config(2, fleet={"A10G": {"batch_size": 4}, "H100": {"batch_size": 16}})) == 16


def test_user_errors_are_found_in_the_text_of_a_failed_actor_constructor() -> None:
    from pipeline.core.errors import ModelError

    text = (
        "The actor died because of an error raised in its creation task, ray::MapWorker.__init__()\n"
        '  File "pipeline/models/weights.py", line 119, in resolve_folder\n'
        "pipeline.core.errors.ModelError: 'x' is neither a local diffusers folder, an object-store URI, nor a hub id"
    )
    found = user_error(RuntimeError(text))
    assert isinstance(found, ModelError) and str(found).startswith("'x' is neither a local diffusers folder")


@pytest.mark.integration  # starts Ray in a process of its own
def test_an_embedded_ray_starts_without_its_token_warning() -> None:
    """Ray 2.60 warns at every start of a local instance that it enabled token authentication
    (RAY_AUTH_MODE unset): nothing to act on for a process-private Ray on loopback. Hidden at the
    CLI's default level, shown with -v (INFO)."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, sys; logging.basicConfig(level=getattr(logging, sys.argv[1])); "
        "from pipeline.run.session import init_ray; init_ray(None); import ray; ray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    for level, shown in (("WARNING", False), ("INFO", True)):
        result = subprocess.run(
            [sys.executable, "-c", code, level], capture_output=True, text=True, timeout=120, env=env
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("Token authentication is enabled" in result.stderr) is shown, result.stderr[-2000:]

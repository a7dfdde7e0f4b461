"""Which jobs run in the driver's process (`resources.in_process`), resolved for this machine."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.config import JobConfig
from pipeline.run import inprocess
from pipeline.run.inprocess import IN_PROCESS_MAX_ROWS, in_process_config


def _config(**more: Any) -> JobConfig:
    return JobConfig.model_validate({"manifest": "m", "output": "o", "model": {"preset": "tiny"}} | more)


def _decide(config: JobConfig, rows: int = 96, **kwargs: Any) -> JobConfig | None:
    found = in_process_config(
        config, rows, ray_address=kwargs.get("ray_address"), metrics_port=kwargs.get("metrics_port"),
        tuning=kwargs.get("tuning", False),
    )  # fmt: skip
    return None if found is None else found[0]


@pytest.mark.parametrize(("gpus", "kind"), [(0, ""), (1, "H100")])
def test_a_small_job_on_one_generator_runs_here(monkeypatch: pytest.MonkeyPatch, gpus: int, kind: str) -> None:
    monkeypatch.setattr(inprocess, "local_gpus", lambda: (gpus, kind))
    resolved = _decide(_config())
    assert resolved is not None and resolved.resources.actors == 1
    assert resolved.resources.gpus_per_actor == (1.0 if gpus else 0.0)
    # model.dtype auto, resolved as on Ray for the machine's GPU type: bfloat16 on an H100.
    assert resolved.model.dtype == ("bfloat16" if gpus else "float32")


def test_ray_runs_large_jobs_several_generators_clusters_fleets_and_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inprocess, "local_gpus", lambda: (1, "A10G"))
    assert _decide(_config(), IN_PROCESS_MAX_ROWS) is not None
    assert _decide(_config(), IN_PROCESS_MAX_ROWS + 1) is None  # Ray restarts a crashed generator
    assert _decide(_config(resources={"in_process": True}), 10**6) is not None
    assert _decide(_config(resources={"in_process": False})) is None
    assert _decide(_config(resources={"actors": 2})) is None
    assert _decide(_config(resources={"gpus_per_actor": 2})) is None  # more GPUs than here
    assert _decide(_config(), ray_address="auto") is None
    assert _decide(_config(), metrics_port=8080) is None
    assert _decide(_config(), tuning=True) is None
    assert _decide(_config(fleet={"A10G": {"batch_size": 4}})) is None
    monkeypatch.setattr(inprocess, "local_gpus", lambda: (4, "A10G"))
    assert _decide(_config()) is None  # one generator per GPU: Ray's
    assert _decide(_config(resources={"actors": 1})) is not None

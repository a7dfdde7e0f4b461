"""Resolving the automatic placement against the cluster's resources (`runner.resolve_resources`)."""

from __future__ import annotations

import logging

import pytest

from pipeline.core.config import JobConfig
from pipeline.core.errors import ConfigError
from pipeline.run.builder import LIGHT_STAGE_CPUS
from pipeline.run.runner import resolve_resources


def _resolve(
    monkeypatch: pytest.MonkeyPatch, cluster: dict[str, float], *, embedded: bool = True, **resources: object
) -> JobConfig:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    config = JobConfig.model_validate({"manifest": "m.parquet", "output": "out", "resources": resources})
    return resolve_resources(config, embedded=embedded)


def test_one_actor_per_gpu_and_the_default_cpu_reservation_when_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = _resolve(monkeypatch, {"CPU": 64.0, "GPU": 8.0}).resources
    assert (resolved.actors, resolved.gpus_per_actor, resolved.cpus_per_actor) == (8, 1.0, 1.0)
    on_cpu = _resolve(monkeypatch, {"CPU": 2.0}).resources
    assert (on_cpu.actors, on_cpu.gpus_per_actor, on_cpu.cpus_per_actor) == (1, 0.0, 1.0)


def test_the_default_cpu_reservation_shrinks_to_leave_the_light_stages_a_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.run.runner"):
        small = _resolve(monkeypatch, {"CPU": 1.5}).resources  # a 1.5-CPU container: 1 actor x 1 CPU
    assert LIGHT_STAGE_CPUS == 1.0  # one read (0.25), one encode (0.5) and one write (0.25) task at once
    assert small.cpus_per_actor == pytest.approx(0.5)
    assert "reserving 0.5 CPU per actor instead" in caplog.text
    two = _resolve(monkeypatch, {"CPU": 2.0}, actors=2).resources
    assert two.cpus_per_actor == pytest.approx(0.5)
    # 8 GPUs and 8 CPUs (a pod's CPU request): the minimum of an autoscaling range counts.
    pod = _resolve(monkeypatch, {"CPU": 8.0, "GPU": 8.0}, actors=[4, 8]).resources
    assert pod.cpus_per_actor == pytest.approx(1.0)
    full = _resolve(monkeypatch, {"CPU": 8.0, "GPU": 8.0}).resources
    assert full.cpus_per_actor == pytest.approx(0.87) and 8 * full.cpus_per_actor + LIGHT_STAGE_CPUS <= 8.0


def test_a_cpu_reservation_the_user_set_that_cannot_fit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=r"2 generator actor\(s\) x 1 CPU .* could never start: set "
                       r"resources.cpus_per_actor to 0.5 or less"):  # fmt: skip
        _resolve(monkeypatch, {"CPU": 2.0}, actors=2, cpus_per_actor=1.0)
    with pytest.raises(ConfigError, match="run fewer actors"):
        _resolve(monkeypatch, {"CPU": 1.0}, actors=8)  # even the default cannot shrink that far
    with pytest.raises(ConfigError, match=r"run it where Ray has at least 1\.1 CPUs"):
        _resolve(monkeypatch, {"CPU": 1.0})  # one actor cannot shrink that far either
    # On a cluster an autoscaler may add CPU nodes: a warning, and the user's value stands.
    with caplog.at_level(logging.WARNING, logger="pipeline.run.runner"):
        kept = _resolve(monkeypatch, {"CPU": 2.0}, embedded=False, actors=2, cpus_per_actor=1.0).resources
    assert kept.cpus_per_actor == 1.0 and "waits until an autoscaler adds CPUs" in caplog.text

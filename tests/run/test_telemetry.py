"""GPU utilisation sampling and the Ray metrics wrapper, without a GPU or Ray."""

from __future__ import annotations

import time

import pytest

from pipeline.run.telemetry import METRICS, JobMetrics, UtilizationSampler, nvml_reader


def test_sampler_averages_the_samples_of_an_interval() -> None:
    values = iter([10.0, 20.0, 30.0] + [40.0] * 1000)
    sampler = UtilizationSampler(lambda: next(values), interval=0.01)
    try:
        deadline = time.monotonic() + 5
        while len(sampler.samples) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        since = sampler.samples[3][0]
        assert sampler.mean_since(since) == 40.0
        assert 10.0 < sampler.mean_since(0) < 40.0  # type: ignore[operator]
        assert sampler.mean_since(time.time() + 60) is None
    finally:
        sampler.stop()


def test_sampler_stops_when_the_reader_fails() -> None:
    def broken() -> float:
        raise RuntimeError("NVML gone")

    sampler = UtilizationSampler(broken, interval=0.01)
    sampler.thread.join(timeout=2)
    assert not sampler.thread.is_alive() and sampler.mean_since(0) is None


def test_no_nvml_without_cuda_and_metrics_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a machine without CUDA, wherever this runs
    assert nvml_reader() is None
    metrics = JobMetrics(job="out", model="tiny")  # outside a Ray worker
    metrics.batch(images=4, calls=[0.5], stages={"denoise": 0.4}, oom_retries=1)
    metrics.gpu(gpu="gpu0", utilization=95.0, memory_peak_bytes=1e9)
    metrics.committed(4, stages={"upload": 0.1})
    assert all(kind in {"counter", "gauge", "histogram"} for kind, _, _ in METRICS.values())

"""Live measurements from the generator actors: GPU utilisation sampled through NVML, and Ray
metrics (`ray.util.metrics`) that Ray's Prometheus export serves while the job runs.

Ray prefixes every metric with `ray_` and adds `_total` to counters, so the dashboard in
`infra/grafana/sdxl-batch.json` queries e.g. `ray_sdxl_batch_images_generated_total`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# name: (kind, description, extra tag keys). Every metric is tagged with `sdxl_job` and `model`.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sdxl_batch_images_generated": ("counter", "Images rendered by the generator actors.", ()),
    "sdxl_batch_images_committed": ("counter", "Images committed to the output (their metadata part written).", ()),
    "sdxl_batch_batch_latency_seconds": ("histogram", "Seconds per model call (a batch of rows).", ()),
    "sdxl_batch_stage_seconds": ("counter", "Busy seconds per stage (text_encode, denoise, ...).", ("stage",)),
    "sdxl_batch_oom_retries": ("counter", "Model calls split and retried after running out of GPU memory.", ()),
    "sdxl_batch_gpu_utilization_percent": ("gauge", "GPU utilisation sampled through NVML (per GPU).", ("gpu",)),
    "sdxl_batch_gpu_memory_peak_bytes": ("gauge", "Peak GPU memory allocated by torch (per GPU).", ("gpu",)),
}
BASE_TAGS = ("sdxl_job", "model")  # not `job`: Prometheus sets that label to the scrape job
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]


class JobMetrics:
    """The job's Ray metrics, recorded from inside a Ray worker. Outside Ray (or where Ray's
    metrics agent is missing) every call is a no-op, so the stages never fail on telemetry."""

    def __init__(self, *, job: str, model: str):
        self.tags = {"sdxl_job": job, "model": model}
        self.metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():  # a job run in the driver's process: no Ray, no metrics
                return
            kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}
            for name, (kind, description, extra) in METRICS.items():
                kwargs: dict[str, Any] = {"description": description, "tag_keys": BASE_TAGS + extra}
                if kind == "histogram":
                    kwargs["boundaries"] = LATENCY_BUCKETS
                self.metrics[name] = kinds[kind](name, **kwargs)
        except Exception as error:  # telemetry must never stop a job
            logger.debug("Ray metrics unavailable: %s", error)
            self.metrics = {}

    def _record(self, name: str, method: str, value: float, **tags: str) -> None:
        metric = self.metrics.get(name)
        if metric is None:
            return
        try:
            getattr(metric, method)(value, tags={**self.tags, **tags})
        except Exception as error:
            logger.debug("cannot record %s: %s", name, error)

    def batch(self, *, images: int, calls: list[float], stages: dict[str, float], oom_retries: int) -> None:
        if images:
            self._record("sdxl_batch_images_generated", "inc", images)
        for seconds in calls:
            self._record("sdxl_batch_batch_latency_seconds", "observe", seconds)
        for stage, seconds in stages.items():
            if seconds > 0:
                self._record("sdxl_batch_stage_seconds", "inc", seconds, stage=stage)
        if oom_retries:
            self._record("sdxl_batch_oom_retries", "inc", oom_retries)

    def gpu(self, *, gpu: str, utilization: float | None, memory_peak_bytes: float | None) -> None:
        if utilization is not None:
            self._record("sdxl_batch_gpu_utilization_percent", "set", utilization, gpu=gpu)
        if memory_peak_bytes is not None:
            self._record("sdxl_batch_gpu_memory_peak_bytes", "set", memory_peak_bytes, gpu=gpu)

    def committed(self, images: int, *, stages: dict[str, float]) -> None:
        self._record("sdxl_batch_images_committed", "inc", images)
        for stage, seconds in stages.items():
            if seconds > 0:
                self._record("sdxl_batch_stage_seconds", "inc", seconds, stage=stage)


def nvml_reader(device_index: int = 0) -> Callable[[], float] | None:
    """A function returning the current utilisation (%) of the CUDA device torch uses as
    `device_index`, through NVML (nvidia-ml-py); None where NVML or the device is not there."""
    try:
        import pynvml
        import torch

        if not torch.cuda.is_available():
            return None
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception as error:  # no driver, no NVML library, MIG without permissions...
        logger.debug("NVML unavailable: %s", error)
        return None

    def read() -> float:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    return read


class UtilizationSampler:
    """Samples a utilisation reader in a daemon thread; `mean_since(t)` averages the samples
    taken after `t` (one batch's interval). NVML itself averages over its own short window."""

    def __init__(self, read: Callable[[], float], *, interval: float = 0.25, keep: int = 4096):
        self.read = read
        self.interval = interval
        self.keep = keep
        self.samples: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpu-utilization", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                value = self.read()
            except Exception as error:
                logger.debug("NVML read failed, sampling stops: %s", error)
                return
            with self.lock:
                self.samples.append((time.time(), value))
                del self.samples[: -self.keep]
            self.stopped.wait(self.interval)

    def mean_since(self, since: float) -> float | None:
        with self.lock:
            values = [value for at, value in self.samples if at >= since]
        return sum(values) / len(values) if values else None

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)


def local_gpus() -> tuple[int, str]:
    """This machine's GPUs that this process may use (CUDA_VISIBLE_DEVICES), and their type as
    Ray names it (`H100`, `A10G`; "" without a GPU), through Ray's own NVML probe (no torch import)."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager as Nvidia

    try:
        visible = Nvidia.get_current_process_visible_accelerator_ids()
        count = len(visible) if visible is not None else Nvidia.get_current_node_num_accelerators()
        kind = (Nvidia.get_current_node_accelerator_type() or "") if count else ""
    except Exception as error:  # no driver, no NVML: no GPU for this job
        logger.debug("no GPU found: %s", error)
        return 0, ""
    return count, kind

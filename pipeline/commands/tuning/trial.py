"""One load, as a Ray Tune trial: the model loaded once on one GPU, then measured at each batch
setting through the job's own stages.

Ray Tune starts the trial in a placement group of one bundle on a node of its type: the GPU, the
CPUs that a GPU of that node gets in a real job, and a sliver of the type's resource
(`tune.load_bundle`). The trial's model actors (`stages.GenerateImages`, one per actor sharing
the GPU) and every task of its measurements run inside that bundle (Tune captures the trial's
child tasks; Ray Data is pointed at the bundle too), so two trials on one node do not skew each
other. Each measurement is a real job (`run.runner.run_job`): read the sample, generate on the
loaded actors (`builder.ModelActors`), encode, and write parts to a scratch output on the node;
the stats records of its parts give the steady rate, memory, busy fraction and the stage the
generator waited on.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commands.tuning.cache import library_versions
from pipeline.commands.tuning.plan import LoadRequest
from pipeline.commands.tuning.points import (
    FAILED,
    INFEASIBLE,
    OK,
    Load,
    Point,
    name_bottleneck,
    warmup_seconds,
    windowed_rate,
)
from pipeline.commands.tuning.space import CPU, BatchCandidates, BatchSetting, LoadSetting
from pipeline.commands.tuning.sweep import sweep_batches
from pipeline.core.config import FleetTypeConfig
from pipeline.core.errors import SdxlBatchError
from pipeline.models.presets import get_preset
from pipeline.plan.settings import SettingDefaults, fill_settings
from pipeline.run.builder import ENCODE_CPUS, LIGHT_STAGE_CPUS, ModelActors, generator_kwargs, generator_runtime_env
from pipeline.run.runner import MIN_ACTOR_CPUS, run_job
from pipeline.run.stages import GenerateImages

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from pipeline.core.config import JobConfig
    from pipeline.output.stats import PartStats

logger = logging.getLogger(__name__)


class Infeasible(Exception):
    """A load setting that cannot run where its trial was placed (recorded, never a failure)."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, passed once through Ray's object store (`tune.with_parameters`):
    never written into Tune's experiment state, so the storage credentials stay in memory."""

    job: JobConfig
    sample: bytes  # the sample as Parquet
    judge: Any  # the QualityJudge actor
    mode: str
    quality_rows: int
    max_memory_fraction: float | None


def request_of(config: dict[str, Any]) -> LoadRequest:
    return LoadRequest(
        accelerator_type=config["accelerator_type"],
        load=LoadSetting.from_dict(config["load"]),
        batches=BatchCandidates.from_dict(config["batches"]),
        reference=bool(config["reference"]),
        in_space=bool(config["in_space"]),
    )


def trial_config(request: LoadRequest) -> dict[str, Any]:
    """Ray Tune's config of a trial: small and free of secrets (it lands in Tune's state files)."""
    return {
        "accelerator_type": request.accelerator_type,
        "load": request.load.to_dict(),
        "batches": request.batches.to_dict(),
        "reference": request.reference,
        "in_space": request.in_space,
    }


def load_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Ray Tune trainable: run one load and report it (as JSON: Tune's loggers stay quiet)."""
    import json

    from ray import tune

    request = request_of(config)
    trial_id = tune.get_context().get_trial_id() or uuid.uuid4().hex[:8]
    load = run_load(request, context, load_id=trial_id)
    tune.report({"images_per_second": load.best_rate(), "load": json.dumps(load.to_dict())})


def run_load(request: LoadRequest, context: TrialContext, *, load_id: str) -> Load:
    """Load the model, render the quality rows, sweep the batch settings; never raises for what
    a setting does (out of memory, a failed load): that is recorded in the Load."""
    import ray

    load = Load(load_id=load_id, accelerator_type=request.accelerator_type, load=request.load, started_at=time.time())
    load.reference, load.in_space = request.reference, request.in_space
    folder = Path(tempfile.mkdtemp(prefix="sdxl-batch-tune-"))
    actors: list[ActorHandle[Any]] = []
    try:
        cpus = _bundle_cpus()
        config = _load_config(context.job, request, folder, context.sample, cpus=cpus)
        placement = _use_placement_group(config, cpus)
        actors = _start_actors(config, request.load.actors_per_gpu)
        described: list[dict[str, Any]] = ray.get([actor.describe.remote() for actor in actors])
        load.loads = len(actors)
        load.node_id, load.gpu = described[0]["node_id"], described[0]["gpu"]
        load.load_seconds = max(d["load_seconds"] for d in described)
        problem = next((d["error"] for d in described if d["error"]), None)
        if problem:
            kind = INFEASIBLE if "out of memory" in problem.lower() else FAILED
            load.status = f"{kind}: {problem.splitlines()[0][:300]}"
            return load
        _submit_quality(context, request, config, actors[0])
        if request.in_space:
            total = described[0]["total_memory_mb"]

            def measure(batch: BatchSetting) -> Point:
                stage = ModelActors(actors, token=f"{load_id}-{uuid.uuid4().hex}", placement=placement)
                return _measure(config, request, batch, stage, total, context.max_memory_fraction, cpus)

            load.points = sweep_batches(request.batches, measure, mode=context.mode)
        load.quality = ray.get(context.judge.verdict.remote(request.accelerator_type, request.load.key))
        load.versions = library_versions()
    except Infeasible as error:
        load.status = f"{INFEASIBLE}: {error}"
    except Exception as error:  # a trial records what went wrong; the search goes on
        logger.exception("load %s on %s failed", request.load.key, request.accelerator_type)
        load.status = f"{FAILED}: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        shutil.rmtree(folder, ignore_errors=True)
        load.ended_at = time.time()
    return load


def _bundle_cpus() -> float:
    """CPUs of the trial's bundle (Tune's placement group), or of the whole cluster without one."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None:
        return float(ray.cluster_resources().get("CPU", 1.0))
    return float(sum(bundle.get("CPU", 0.0) for bundle in group.bundle_specs))


def _load_config(job: JobConfig, request: LoadRequest, folder: Path, sample: bytes, *, cpus: float) -> JobConfig:
    """The job's config for this load's measurements: its model with the load setting, the
    sample as manifest, a scratch output, and actors sharing one GPU (or this machine)."""
    import os

    (folder / "sample.parquet").write_bytes(sample)
    actors = request.load.actors_per_gpu
    on_gpu = request.accelerator_type != CPU
    cpus_per_actor = min(job.resources.cpus_per_actor, (cpus - LIGHT_STAGE_CPUS) / actors)
    if cpus_per_actor < MIN_ACTOR_CPUS:
        raise Infeasible(
            f"{actors} actor(s) per GPU leave the read, encode and write stages less than {LIGHT_STAGE_CPUS:g} of "
            f"the {cpus:g} CPUs this GPU gets on its node"
        )
    resources: dict[str, Any] = {
        "actors": actors,
        "gpus_per_actor": 1.0 / actors if on_gpu else 0.0,
        "cpus_per_actor": round(cpus_per_actor, 3),
        "max_retries": 0,
    }
    if not on_gpu:  # actors sharing the machine's cores split its threads
        resources["torch_threads"] = max(1, (os.cpu_count() or 1) // actors)
    return job.model_copy(
        update={
            "manifest": str(folder / "sample.parquet"),
            "output": str(folder / "out"),
            "on_bad_row": "skip",
            "model": request.load.apply(job.model),
            "resources": job.resources.model_copy(update=resources),
            "fleet": {},
        }
    )


def _use_placement_group(config: JobConfig, cpus: float) -> dict[str, Any]:
    """Ray remote args that put every task of the trial's measurements in its bundle (`ModelActors`:
    Ray Data's tasks would otherwise spread over the cluster), and Ray Data's budget set to the
    bundle, less what the model actors hold; its console output stays in its log file.

    Not DataContext's placement-group strategies: with both set, Ray Data 2.60 takes its budget
    from the bundles alone, which hold no object-store memory, and every stage waited on the
    others (measured on CPU with two actors per GPU: 32 s per measurement instead of 7)."""
    import ray
    import ray.data
    from ray.data._internal.execution.interfaces.execution_options import ExecutionResources
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.run.session import quiet_ray_data_console

    context = ray.data.DataContext.get_current()
    resources = config.resources
    held = resources.max_actors * resources.cpus_per_actor  # the model actors' (Ray Data's stages need no GPU)
    context.execution_options.resource_limits = ExecutionResources(cpu=max(cpus - held, 0.0), gpu=0.0)
    quiet_ray_data_console()
    group = ray.util.get_current_placement_group()
    if group is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def _start_actors(config: JobConfig, count: int) -> list[ActorHandle[Any]]:
    """The load's model actors: each loads the pipeline once, sharing the trial's GPU."""
    import ray

    resources = config.resources
    remote = ray.remote(GenerateImages).options(
        num_gpus=resources.gpus_per_actor or 0,
        num_cpus=resources.cpus_per_actor,
        max_restarts=0,
        runtime_env=generator_runtime_env(config) or None,
    )
    actors: list[ActorHandle[Any]] = [remote.remote(**generator_kwargs(config)) for _ in range(count)]  # type: ignore[misc]
    return actors


def _submit_quality(context: TrialContext, request: LoadRequest, config: JobConfig, actor: ActorHandle[Any]) -> None:
    """Render the sample's first rows one at a time and send their pixels to the judge."""
    import ray

    sample = pq.read_table(pa.BufferReader(context.sample)).slice(0, context.quality_rows)
    defaults = SettingDefaults.from_config(config.generation, get_preset(config.model.preset))
    rows = fill_settings(sample, defaults)
    ray.get(actor.configure.remote(batch_size=1, vae_batch_size=None, split_on_oom=True))
    rendered = ray.get(actor.render_batch.remote(rows))
    pixels = np.concatenate([np.frombuffer(p, dtype=np.uint8) for p in rendered.column("pixels").to_pylist()])
    ray.get(
        context.judge.submit.remote(request.accelerator_type, request.load.key, pixels, reference=request.reference)
    )


def _measure(
    config: JobConfig,
    request: LoadRequest,
    batch: BatchSetting,
    stage: ModelActors,
    total_memory_mb: float | None,
    max_memory_fraction: float | None,
    cpus: float,
) -> Point:
    """One measurement: the sample through the job's stages with this batch setting."""
    import ray

    load_id = stage.token.split("-", 1)[0]
    point = Point(request.accelerator_type, request.load, batch, OK, load_id=load_id, started_at=time.time())
    size = batch.batch_size
    ray.get([
        actor.configure.remote(batch_size=size, vae_batch_size=batch.vae_batch_size, split_on_oom=False)
        for actor in stage.actors
    ])  # fmt: skip
    fleet = {
        request.accelerator_type: FleetTypeConfig(
            batch_size=size, gpus=1, encode_cpus_per_gpu=batch.encode_cpus_per_gpu
        )
    }
    job = config.model_copy(
        update={"generation": config.generation.model_copy(update={"batch_size": size}), "fleet": fleet}
    )
    records: list[PartStats] = []
    try:
        result = run_job(job, progress=False, overwrite=True, generate=stage, on_part=records.append)
    except SdxlBatchError as error:
        message = str(error)
        point.status = (
            f"{INFEASIBLE}: out of memory"
            if "out of memory" in message.lower()
            else f"{FAILED}: {message.splitlines()[0][:300]}"
        )
        point.ended_at = time.time()
        return point
    stats = result.job_stats
    point.images_per_second, point.spread, point.windows = windowed_rate(records)
    point.rows, point.model_calls = stats.totals.rows, stats.model_calls
    point.warmup_seconds = warmup_seconds(records)
    point.peak_memory_mb = stats.peak_gpu_memory_mb() or stats.peak_memory_mb()
    point.busy_fraction = stats.busy_fraction()
    point.stage_seconds = {k: round(v, 3) for k, v in result.stats["stage_seconds"].items()}
    point.node_id = next(iter(stats.workers.values())).node if stats.workers else ""
    free = max(cpus - config.resources.max_actors * config.resources.cpus_per_actor, ENCODE_CPUS)
    point.bottleneck = name_bottleneck(
        busy=point.busy_fraction, rate=point.images_per_second, stage_seconds=result.stats["stage_seconds"],
        rows=point.rows, cpus={"encode": batch.encode_cpus_per_gpu or free, "write": free},
    )  # fmt: skip
    if total_memory_mb and point.peak_memory_mb:
        point.memory_fraction = round(point.peak_memory_mb / total_memory_mb, 4)
        if max_memory_fraction is not None and point.memory_fraction > max_memory_fraction:
            point.status = (
                f"{INFEASIBLE}: {point.memory_fraction:.0%} of the GPU's memory > --max-memory-fraction "
                f"{max_memory_fraction:.0%}"
            )
    point.ended_at = time.time()
    return point

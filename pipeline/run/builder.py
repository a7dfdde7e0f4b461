"""One builder turns the config and the manifest plan into the Ray Data graph:

    read (tasks) → generate (actor pool, GPUs) → encode (CPU tasks) → write parts (tasks)

Encoding runs in its own CPU stage so that the GPU actors hand off raw pixels and go straight
back to denoising; the writer batches rows into commit units (`write.rows_per_part`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.core.layout import metadata_schema
from pipeline.models.presets import get_preset
from pipeline.output.stats import job_label
from pipeline.output.writer import ModelInfo, PartWriter
from pipeline.plan.manifest import rules_for
from pipeline.plan.settings import SettingDefaults
from pipeline.run.fleet import FleetSlots
from pipeline.run.nodes import watch_nodes
from pipeline.run.stages import EncodeImages, GenerateImages, ReadManifest, RemoteGenerate, WriteParts

if TYPE_CHECKING:
    import ray.data
    from ray.actor import ActorHandle

    from pipeline.core.config import JobConfig, ResourcesConfig

# Light stages reserve fractions of a CPU so that, on a small machine, they run beside the
# generator actors instead of queueing behind them.
READ_CPUS = 0.25
ENCODE_CPUS = 0.5
WRITE_CPUS = 0.25
# What must stay free beside the generator actors: one task of every light stage at once. Ray
# Data 2.60's resource allocator (ReservationOpResourceAllocator) reserves one task's resources
# for each stage in graph order while they fit; a stage left without a reservation runs only on
# what the others leave over. With less than this sum free, the write stage, last, got none:
# the read and encode tasks kept every spare CPU and no part was committed until every read
# had finished (measured: 100M rows with 90M done on 2 CPUs, the repartition not fused: no part
# after 10 minutes).
LIGHT_STAGE_CPUS = READ_CPUS + ENCODE_CPUS + WRITE_CPUS


def model_info(config: JobConfig) -> ModelInfo:
    """What every metadata row records about the model: preset, scheduler and its config, weights."""
    preset = get_preset(config.model.preset)
    model = config.model
    weights = [model.path or preset.base]
    weights += [ref for ref in (model.unet or preset.unet, model.lora or preset.lora, model.vae) if ref]
    weights += [f"{lora.path}@{lora.weight:g}" for lora in model.loras]
    return ModelInfo(model=preset.name, scheduler=preset.scheduler_label(), weights=" + ".join(weights))


def generator_runtime_env(config: JobConfig) -> dict[str, dict[str, str]]:
    """On CPU, start the actor's process with OMP_NUM_THREADS set to its torch threads.

    Ray starts workers with OMP_NUM_THREADS=num_cpus (1), and OpenMP sizes its pool at start-up:
    a later `torch.set_num_threads` cannot fully undo that (measured ~15% slower on 2 cores).
    """
    if config.resources.on_gpu:
        return {}
    threads = config.resources.torch_threads or os.cpu_count() or 1
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}}


def retry_bounds(resources: ResourcesConfig, *, actor: bool) -> dict[str, Any]:
    """Ray remote options that bound how often a stage's dead workers are replaced.

    Ray Data's defaults are unbounded (tasks `max_retries=-1`; actors `max_restarts=-1` and
    `max_task_retries=-1`), so a process that dies every time (a corrupt weight file that
    segfaults on load, a GPU driver crashing in the first kernel) is restarted for ever: measured
    in Ray 2.60, a job whose generator dies on load, on every batch, or whose encode task dies,
    was still looping after 120 s. A bound of `resources.max_retries` still rides out a lost node
    or a one-off crash. Ray counts an actor's restarts over its lifetime, not consecutively.

    An actor's batches keep Ray Data's unbounded retries: the actor's restarts bound them (a batch
    retried on a dead actor waits for its restart, and fails once the actor is out of restarts).
    A batch of its own bound lost the job to a single lost node: until Ray declares the node dead
    (its health checks, seconds to a minute), each retry of the batch fails at once as "the actor
    is temporarily unavailable" (ActorUnavailableError), and 2 retries were gone 5 s after the
    loss, with a node left to restart the actor on (tests/integration/test_node_loss.py).
    """
    bound = resources.max_retries
    if actor:
        return {"max_restarts": bound, "max_task_retries": -1}
    return {"max_retries": bound}


def generator_kwargs(config: JobConfig) -> dict[str, Any]:
    """What Ray constructs each `GenerateImages` actor from (`fn_constructor_kwargs`): the model,
    where its weights are, and how the actor runs it. Shipped to every actor, so only these."""
    resources = config.resources
    return {
        "model": config.model,
        "storage": config.storage,
        "batch_size": config.generation.batch_size,
        "torch_threads": resources.torch_threads,
        "on_gpu": resources.on_gpu,
        "job": job_label(config.output),
        "fleet": dict(config.fleet) or None,
    }


class GeneratorPool:
    """The generate stage of a job: Ray Data's pool of `GenerateImages` actors, one setting for
    every GPU, or one actor per GPU slot of a mixed fleet (`run.fleet`), in blocks of the largest
    batch size (each fleet actor renders them in calls of its own type's)."""

    def __init__(self, *, progress: ActorHandle[Any] | None = None) -> None:
        self.placement: dict[str, Any] = {}  # every stage's tasks go where Ray Data schedules them
        self.progress = progress  # the job's ProgressBoard, which the actors tell what they render

    def map_args(self, config: JobConfig) -> dict[str, Any]:
        import ray.data

        resources = config.resources
        args: dict[str, Any] = {
            "fn": GenerateImages,
            "fn_constructor_kwargs": generator_kwargs(config) | {"progress": self.progress},
            "batch_size": max(config.batch_sizes),
            "compute": ray.data.ActorPoolStrategy(min_size=resources.actor_range[0], max_size=resources.actor_range[1]),
            "num_gpus": resources.gpus_per_actor or None,
            "num_cpus": resources.cpus_per_actor,
            "runtime_env": generator_runtime_env(config) or None,
            **retry_bounds(resources, actor=True),
        }
        if config.fleet:
            args["ray_remote_args_fn"] = FleetSlots(dict(config.fleet))
        return args

    def watch(self, dataset: ray.data.Dataset, config: JobConfig) -> None:
        # A bounded wait when no node can run a generator actor (of the fleet's types).
        watch_nodes(dataset, config.resources, frozenset(config.fleet))


class ModelActors:
    """The generate stage over model actors that outlive the dataset (`tune`: a model loaded once
    per load setting, measured at several batch sizes): one `RemoteGenerate` per actor. `token`
    names the dataset, so that each of its stages claims an actor of its own. `placement`: Ray
    remote args that every stage's tasks take (the trial's placement group)."""

    def __init__(self, actors: list[ActorHandle[Any]], *, token: str, placement: dict[str, Any] | None = None):
        self.actors = actors
        self.token = token
        self.placement = placement or {}

    def map_args(self, config: JobConfig) -> dict[str, Any]:
        import ray.data

        return {
            "fn": RemoteGenerate,
            "fn_constructor_kwargs": {"actors": self.actors, "token": self.token},
            "batch_size": max(config.batch_sizes),
            "compute": ray.data.ActorPoolStrategy(size=len(self.actors)),
            "num_cpus": 0,
            # A measurement that fails is the finding (an out-of-memory batch size): no retries.
            "max_restarts": 0,
            "max_task_retries": 0,
            **self.placement,
        }

    def watch(self, dataset: ray.data.Dataset, config: JobConfig) -> None:
        pass  # the model actors are placed already


def encode_concurrency(config: JobConfig) -> int | None:
    """Encode tasks at once when every fleet type caps the encode CPUs per GPU
    (`fleet.<type>.encode_cpus_per_gpu`), else None: Ray Data sizes the stage to the free CPUs."""
    caps = [(t.gpus or 0) * t.encode_cpus_per_gpu for t in config.fleet.values() if t.encode_cpus_per_gpu]
    if not config.fleet or len(caps) < len(config.fleet):
        return None
    return max(1, round(sum(caps) / ENCODE_CPUS))


def read_stage(config: JobConfig, passthrough: pa.Schema, masks: dict[int, Any]) -> ReadManifest:
    """The reader, with the job's setting defaults, the preset's limits for a row's own values,
    the planned types of the manifest's pass-through columns and the files' pending-row masks."""
    preset = get_preset(config.model.preset)
    return ReadManifest(
        storage=config.storage,
        defaults=SettingDefaults.from_config(config.generation, preset),
        rules=rules_for(preset),
        passthrough=passthrough,
        masks=masks,
    )


def encode_stage(config: JobConfig) -> EncodeImages:
    return EncodeImages(image_format=config.generation.image_format, quality=config.generation.image_quality)


def write_stage(config: JobConfig, passthrough: pa.Schema) -> WriteParts:
    writer = PartWriter(
        output=config.output,
        layout=config.write.layout,
        image_format=config.generation.image_format,
        model=model_info(config),
        storage=config.storage,
        schema=metadata_schema(passthrough),
        captions=config.write.captions,
    )
    return WriteParts(writer=writer, job=job_label(config.output))


@contextmanager
def _remote_args_allowed() -> Iterator[None]:
    """Ray 2.60's map_batches takes the retry bounds only as extra Ray remote args, which it
    deprecates (for named parameters it does not have yet) with a warning on the user's console;
    likewise `ray_remote_args_fn`, which gives each actor of a fleet its type's resources (to be
    removed in Ray 2.64, with no replacement yet). Ray is pinned; tests/integration/test_crashes.py
    fails if an upgrade drops the bounds, tests/integration/test_fleet.py if it drops the fleet's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated", category=DeprecationWarning)
        yield


def build_dataset(
    config: JobConfig,
    tasks: list[dict[str, Any]],
    *,
    masks: dict[int, Any],
    slice_rows: int,
    passthrough: pa.Schema | None = None,
    generate: GeneratorPool | ModelActors | None = None,
) -> ray.data.Dataset:
    """The graph over read `tasks` (`RowPlan.read_tasks`: one per row group with rows to render;
    `masks`: each file's pending rows, as planned), whose rows reach the generators in blocks of
    `slice_rows`. `config` has its placement resolved (`runner.resolve_resources`);
    `passthrough`: the manifest's other columns, as planned; `generate`: how the generate stage
    runs (default: the job's actor pool)."""
    generate = generate or GeneratorPool()
    with _remote_args_allowed():
        schema = pa.schema([]) if passthrough is None else passthrough
        dataset = _graph(config, tasks, masks, slice_rows, schema, generate)
    generate.watch(dataset, config)
    return dataset


def _repartition(dataset: ray.data.Dataset, rows: int, *, remote_args: dict[str, Any]) -> ray.data.Dataset:
    """Ray Data's streaming repartition into blocks of `rows` rows, its tasks run with the
    upstream stage's `remote_args` (its CPU reservation and retry bound).

    Ray 2.60's `repartition()` takes no Ray remote args, and its tasks default to a whole CPU:
    on a node whose CPUs the actors hold but a fraction, they wait behind every lighter task.
    With exactly the upstream map's remote args they fuse into its tasks (Ray fuses a map and the
    repartition after it only when their args are equal: the read's `max_retries` too), so a read
    task cuts its row group into slices itself and the job has one stage fewer to reserve CPUs
    for. The logical operator keeps the args its tasks are planned with; Ray is pinned
    (pyproject.toml) and tests/run/test_builder.py checks the fused plan."""
    from ray.data._internal.logical.operators import StreamingRepartition

    dataset = dataset.repartition(target_num_rows_per_block=rows)
    operator = dataset._logical_plan.dag
    if isinstance(operator, StreamingRepartition):  # else Ray changed: its default reservation stands
        operator.ray_remote_args.update(remote_args)
    return dataset


def _graph(
    config: JobConfig,
    tasks: list[dict[str, Any]],
    masks: dict[int, Any],
    slice_rows: int,
    passthrough: pa.Schema,
    generate: GeneratorPool | ModelActors,
) -> ray.data.Dataset:
    import ray.data

    resources = config.resources
    tasks_retry = {**retry_bounds(resources, actor=False), **generate.placement}
    dataset: ray.data.Dataset = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    dataset = dataset.map_batches(
        read_stage(config, passthrough, masks), batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS, **tasks_retry
    )
    # A read task yields a whole row group's pending rows; the generators take them in slices
    # (runner.read_slice_rows: a crash loses at most a slice, and parts commit early).
    dataset = _repartition(dataset, slice_rows, remote_args={"num_cpus": READ_CPUS, **tasks_retry})
    dataset = dataset.map_batches(batch_format="pyarrow", **generate.map_args(config))
    dataset = dataset.map_batches(
        encode_stage(config),
        batch_size=config.generation.batch_size,
        batch_format="pyarrow",
        num_cpus=ENCODE_CPUS,
        concurrency=encode_concurrency(config),
        **tasks_retry,
    )
    return dataset.map_batches(
        write_stage(config, passthrough),
        batch_size=config.write.rows_per_part,
        batch_format="pyarrow",
        num_cpus=WRITE_CPUS,
        **tasks_retry,
    )

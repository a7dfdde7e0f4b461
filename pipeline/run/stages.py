"""The Ray Data stages. Each is a small callable over a `pyarrow.Table` batch: one row in, one
row out (except the reader, which expands a fragment into its rows, and the writer, which turns a
part into one summary row). Each declares the columns it needs and fails naming itself and the
missing ones, so a wiring mistake is obvious. Each takes, as keyword arguments, only the settings
it uses (`builder` picks them from the job's config), so what a stage depends on is in its signature.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.core.accelerators import type_of_resources
from pipeline.core.errors import ModelError, SdxlBatchError
from pipeline.output.stats import Call, PartStats
from pipeline.output.writer import TELEMETRY, PartWriter
from pipeline.plan.manifest import COLUMNS, Fragment, RowRules
from pipeline.plan.rows import read_pending, resolve, unpack_mask
from pipeline.plan.schema import conform
from pipeline.plan.settings import SettingDefaults, fill_settings, group_by_settings, order_by_settings
from pipeline.run.encoding import encode_batch
from pipeline.run.telemetry import JobMetrics, UtilizationSampler, nvml_reader

if TYPE_CHECKING:
    import torch
    from ray.actor import ActorHandle

    from pipeline.core.config import FleetTypeConfig, ModelConfig, StorageConfig
    from pipeline.core.render import RenderSettings
    from pipeline.models.generator import ImageGenerator

logger = logging.getLogger(__name__)


def require_columns(stage: str, batch: pa.Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise KeyError(f"stage {stage!r} needs columns {missing}, got {batch.column_names}")


class ReadManifest:
    """Read tasks (a row group with rows to render) → its pending rows, with every render setting
    resolved."""

    needs = (*(f.name for f in fields(Fragment)), "file", "file_rows")

    def __init__(
        self,
        *,
        storage: StorageConfig,
        defaults: SettingDefaults,
        rules: RowRules,
        masks: dict[int, Any],
        passthrough: pa.Schema | None = None,
    ):
        """`masks`: each manifest file's pending rows (`plan.rows`: packed bits, or a Ray object
        reference to them); `passthrough`: the planned types of the manifest's other columns
        (plan.schema); every slice is conformed to it, so all blocks share one schema. None
        keeps them as read."""
        self.storage = storage
        self.defaults = defaults
        self.rules = rules
        self.passthrough = passthrough
        self.masks = masks
        self._opened: tuple[int, np.ndarray] | None = None  # the last file's mask: tasks come in file order

    def _mask(self, file: int, rows: int) -> np.ndarray:
        if self._opened is None or self._opened[0] != file:
            self._opened = (file, unpack_mask(resolve(self.masks[file]), rows))
        return self._opened[1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns("read", batch, self.needs)
        tables = []
        for task in batch.select(list(self.needs)).to_pylist():
            # Done rows (resume) and rejected rows never reach a GPU.
            table = read_pending(task, self._mask(task["file"], task["file_rows"]), self.storage, self.rules)
            # In runs of equal settings: a slice of one run is one full model call (`order_by_settings`).
            table = order_by_settings(fill_settings(table, self.defaults))
            tables.append(table if self.passthrough is None else conform(table, self.passthrough, keep=COLUMNS))
        return pa.concat_tables(tables, promote_options="permissive")


class GenerateImages:
    """The GPU stage: an actor that loads the pipeline once and renders batches of rows.

    In a job, Ray Data's actor pool runs it; `tune` runs it as a plain Ray actor that outlives the
    datasets of its measurements (`RemoteGenerate`), changing only how rows are batched between
    them (`configure`), so that a model is loaded once per setting that changes what is loaded."""

    needs = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale")

    def __init__(
        self,
        *,
        model: ModelConfig,
        storage: StorageConfig,
        batch_size: int,
        torch_threads: int | None,
        on_gpu: bool,
        job: str,
        fleet: dict[str, FleetTypeConfig] | None = None,
        progress: ActorHandle[Any] | None = None,
        in_process: bool = False,
    ):
        """Ray constructs the actor from these (`fn_constructor_kwargs`). `job`: the Ray metrics'
        job tag (`stats.job_label`). `fleet`: a mixed fleet's settings per GPU type; the actor
        takes those of the type it was placed on (`run.fleet`: one pool, each actor asking for
        its type's resource), so Ray Data's blocks of the largest batch size are rendered in
        calls of this type's own. `progress`: the job's `ProgressBoard`, told of the load and of
        each model call's rows (the driver's progress line). `in_process`: in the driver's own
        process, not a Ray actor (`run.inprocess`)."""
        self.node, self.actor, self.gpu, self.accelerator_type = _placement(on_gpu=on_gpu, in_process=in_process)
        self.progress = progress
        if progress is not None:
            progress.loading.remote(self.actor)
        self.claimed_by: str | None = None
        self.load_seconds = 0.0
        problem = None
        if fleet:
            settings = fleet.get(self.accelerator_type)
            if settings is None:
                problem = ModelError(
                    f"a generator actor was placed on a {self.accelerator_type} GPU, which the job's fleet section "
                    f"does not list ({', '.join(sorted(fleet))})"
                )
            else:
                model = model.model_copy(update=settings.model_overrides())
                batch_size = settings.batch_size
        # Every torch call of this actor runs on this one thread. Ray runs the constructor on the
        # process's main thread and batches on an executor thread; OpenMP keeps a thread team per
        # calling thread, and with two teams on a node's cores its workers stop spinning and sleep
        # between parallel regions (measured on 2 cores: a fifth of the CPU idle, ~10% slower).
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-batch-torch")
        load = self._torch.submit(
            self._load, model, storage, batch_size=batch_size, torch_threads=torch_threads, on_gpu=on_gpu
        )
        loaded = load.result()
        self.load_error = problem or loaded
        if progress is not None and self.load_error is None:
            progress.loaded.remote(self.actor)
        self.metrics = JobMetrics(job=job, model=self.generator.model_name)
        read = nvml_reader() if self.load_error is None and self.generator.device == "cuda" else None
        self.sampler = UtilizationSampler(read) if read else None

    def _load(
        self, model: ModelConfig, storage: StorageConfig, *, batch_size: int, torch_threads: int | None, on_gpu: bool
    ) -> SdxlBatchError | None:
        from pipeline.models.generator import ImageGenerator

        _set_torch_threads(torch_threads, on_gpu=on_gpu)
        self.generator = ImageGenerator(model, storage, batch_size=batch_size)
        start = time.perf_counter()
        try:
            self.generator.load()
            self.load_seconds = time.perf_counter() - start
        except SdxlBatchError as error:
            # Raised from the first batch instead: Ray reports a failed actor constructor with a
            # traceback and retries it, while a task's error reaches the driver as itself.
            return error
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.load_error is not None:
            raise self.load_error
        require_columns("generate", batch, self.needs)
        return self._torch.submit(self._generate, batch).result()

    # --- as a long-lived actor (`tune`) ---------------------------------------------------------

    def render_batch(self, batch: pa.Table) -> pa.Table:
        """`__call__`, as a Ray actor method (`RemoteGenerate` calls it)."""
        return self(batch)

    def claim(self, token: str) -> bool:
        """Whether a dataset's stage (`RemoteGenerate`, one per actor) may take this actor for the
        dataset `token`: the first to ask does."""
        if self.claimed_by == token:
            return False
        self.claimed_by = token
        return True

    def configure(self, *, batch_size: int, vae_batch_size: int | None, split_on_oom: bool) -> None:
        """How rows are batched from now on (`ImageGenerator.configure`), on the torch thread."""
        self._torch.submit(
            self.generator.configure, batch_size=batch_size, vae_batch_size=vae_batch_size, split_on_oom=split_on_oom
        ).result()

    def close(self) -> None:
        """Let the model go (a job run in the driver's process, which may load another next:
        `compare`), and the torch thread with it."""
        self._torch.shutdown(wait=True)
        self.__dict__.pop("generator", None)
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as error:  # freeing memory must not fail a finished job
            logger.debug("cannot empty the CUDA cache: %s", error)

    def describe(self) -> dict[str, Any]:
        """Where the actor runs and what it loaded (`tune` records it per load)."""
        generator = self.generator
        return {
            "node_id": self.node,
            "actor": self.actor,
            "gpu": self.gpu,
            "accelerator_type": self.accelerator_type,
            "device": generator.device,
            "dtype": generator.dtype_name,
            "vae": generator.vae_label() if generator.dtype is not None else "",
            "techniques": list(generator.techniques),
            "load_seconds": self.load_seconds,
            "total_memory_mb": generator.total_memory_mb() if self.load_error is None else None,
            "error": str(self.load_error) if self.load_error is not None else None,
        }

    def _generate(self, batch: pa.Table) -> pa.Table:
        batch, groups = contiguous_groups(batch)
        n = batch.num_rows
        seconds = [0.0] * n
        call_sizes = [0] * n
        prompts, negatives, seeds = (batch.column(c).to_pylist() for c in ("prompt", "negative_prompt", "seed"))
        retries_before = self.generator.oom_retries
        phases_before = dict(self.generator.stage_seconds)
        calls: list[Call] = []
        started = time.time()
        pixels = PixelColumn([(s.height, s.width) for s, (lo, hi) in groups for _ in range(lo, hi)], self.generator)
        for settings, (lo, hi) in groups:
            start = time.perf_counter()
            _, sizes = self.generator.render(
                prompts[lo:hi], negatives[lo:hi], seeds[lo:hi], settings, out=pixels.rows(lo, hi, settings)
            )
            elapsed = time.perf_counter() - start
            calls.append((hi - lo, elapsed, time.time()))  # images, seconds, when it ended
            if self.progress is not None:
                self.progress.add.remote(hi - lo, calls[-1][2] - elapsed)
            seconds[lo:hi] = [elapsed / (hi - lo)] * (hi - lo)
            call_sizes[lo:hi] = sizes
        prompt_tokens, limit = self.generator.token_counts(prompts)
        negative_tokens, _ = self.generator.token_counts(negatives)
        columns = {
            "pixels": pixels.to_arrow(),
            "generation_seconds": pa.array(seconds, pa.float64()),
            "render_batch_size": pa.array(call_sizes, pa.int32()),
            "prompt_tokens": pa.array(prompt_tokens, pa.int32()),
            "prompt_truncated": pa.array([t > limit for t in prompt_tokens], pa.bool_()),
            "negative_prompt_truncated": pa.array([t > limit for t in negative_tokens], pa.bool_()),
            "peak_memory_mb": pa.array([self.generator.peak_memory_mb()] * n, pa.float64()),
            "node": pa.array([self.node] * n, pa.string()),
            "actor": pa.array([self.actor] * n, pa.string()),
            "accelerator_type": pa.array([self.accelerator_type] * n, pa.string()),
            "dtype": pa.array([self.generator.dtype_name] * n, pa.string()),
            "vae": pa.array([self.generator.vae_label()] * n, pa.string()),
            "attention": pa.array([self.generator.model.attention] * n, pa.string()),
            TELEMETRY: pa.array(
                [self._telemetry(n, started, retries_before, phases_before, calls).to_json()] + [None] * (n - 1),
                pa.string(),
            ),
        }
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch

    def _telemetry(
        self, rows: int, started: float, retries_before: int, phases_before: dict[str, float], calls: list[Call]
    ) -> PartStats:
        """This batch's stats record, counted once (as JSON on its first row): where it ran,
        out-of-memory retries, seconds per phase (text encoding, denoising, VAE decoding, copy to
        host), (images, seconds, end time) per model call, GPU utilisation and memory. The same
        figures go to Ray's metrics."""
        generator = self.generator
        phases = {stage: seconds - phases_before.get(stage, 0.0) for stage, seconds in generator.stage_seconds.items()}
        retries = generator.oom_retries - retries_before
        on_gpu = generator.device == "cuda"
        utilization = self.sampler.mean_since(started) if self.sampler else None
        memory_mb = generator.peak_memory_mb()
        self.metrics.batch(images=rows, calls=[c[1] for c in calls], stages=phases, oom_retries=retries)
        if on_gpu:
            self.metrics.gpu(gpu=self.gpu, utilization=utilization, memory_peak_bytes=memory_mb * 2**20)
        return PartStats.of_batch(
            actor=self.actor,
            node=self.node,
            gpu=self.gpu,
            device=generator.device,
            rows=rows,
            calls=calls,
            oom_retries=retries,
            stage_seconds=phases,
            utilization=utilization,
            gpu_memory_peak_mb=memory_mb if on_gpu else None,
            lora_layers_unmatched=generator.lora_layers_unmatched,
            accelerator_type=self.accelerator_type,
        )


def _set_torch_threads(requested: int | None, *, on_gpu: bool) -> None:
    """On CPU the generator is the bottleneck, so by default it may use every core of its node
    (Ray otherwise pins OMP threads to the actor's `num_cpus`). On GPU, Ray's default stands."""
    import os

    threads = requested or (None if on_gpu else os.cpu_count())
    if threads:
        import torch

        torch.set_num_threads(threads)


def _placement(*, on_gpu: bool, in_process: bool = False) -> tuple[str, str, str, str]:
    """This actor's node id, actor id, GPU label (`gpu<ids>` as Ray assigned them; "" on CPU)
    and GPU type (`accelerator_type`)."""
    if in_process:  # a job run in the driver's process (`run.inprocess`), with or without Ray
        from pipeline.run.telemetry import local_gpus

        kind = (local_gpus()[1] or "GPU") if on_gpu else "CPU"
        return f"local:{socket.gethostname()}", f"process-{os.getpid()}", "gpu0" if on_gpu else "", kind
    import ray

    context = ray.get_runtime_context()
    actor = context.get_actor_id() or context.get_worker_id()
    gpu_ids = ray.get_gpu_ids()
    gpu = "gpu" + ",".join(str(i) for i in gpu_ids) if gpu_ids else ""
    return context.get_node_id(), actor, gpu, accelerator_type(on_gpu=on_gpu)


def accelerator_type(*, on_gpu: bool) -> str:
    """Ray's name of this worker's GPU type (`A10G`, `H100`, ...): the `accelerator_type:<T>`
    resource it was given (a fleet job asks for its type) or its node has; `GPU` for a GPU node
    without one, `CPU` for an actor without a GPU."""
    import ray

    context = ray.get_runtime_context()
    found = type_of_resources(context.get_assigned_resources())
    if found is None and on_gpu:
        node = next((n for n in ray.nodes() if n.get("NodeID") == context.get_node_id()), None)
        found = type_of_resources((node or {}).get("Resources") or {})
    return found or ("GPU" if on_gpu else "CPU")


class RemoteGenerate:
    """The generate stage of a dataset whose model actors outlive it (`tune`'s measurements): Ray
    Data's actor pool holds one of these per model actor, each passing its batches to the actor it
    claimed (`GenerateImages.claim`). The pixels cross the object store once more than in a job
    (a copy of some 25 MB per batch of 8 at 1024², milliseconds against seconds of GPU time)."""

    needs = GenerateImages.needs

    def __init__(self, *, actors: list[ActorHandle[Any]], token: str):
        import ray

        self.actor: ActorHandle[Any]
        for actor in actors:
            if ray.get(actor.claim.remote(token)):
                self.actor = actor
                return
        raise RuntimeError(f"no model actor left to claim for {token} ({len(actors)} actors)")

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        try:
            result: pa.Table = ray.get(self.actor.render_batch.remote(batch))
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, SdxlBatchError):  # ours, as the actor raised it (not Ray's wrapping)
                raise error.cause from None
            raise
        return result


def contiguous_groups(batch: pa.Table) -> tuple[pa.Table, list[tuple[RenderSettings, tuple[int, int]]]]:
    """The batch with rows of equal render settings next to each other, and each group's settings
    and row range. A batch's rows are independent, so their order within it is free; each model
    call then writes one contiguous slice of the batch's pixel buffer."""
    groups = group_by_settings(batch)
    order = [i for indices in groups.values() for i in indices]
    if order != list(range(batch.num_rows)):
        batch = batch.take(pa.array(order, pa.int64()))
    ranges, start = [], 0
    for settings, indices in groups.items():
        ranges.append((settings, (start, start + len(indices))))
        start += len(indices)
    return batch, ranges


class PixelColumn:
    """The uint8 pixels of a batch in one host buffer (page-locked on CUDA, see
    `ImageGenerator.host_pixels`), row after row, handed to Arrow without a copy: the pixels
    cross from the GPU once, straight into the column the next stage reads."""

    def __init__(self, shapes: list[tuple[int, int]], generator: ImageGenerator):
        import numpy as np

        sizes = [height * width * 3 for height, width in shapes]
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.data = generator.host_bytes(int(self.offsets[-1]))

    def rows(self, start: int, end: int, settings: RenderSettings) -> torch.Tensor:
        """Rows start..end (of equal settings) as one (rows, height, width, 3) view."""
        view = self.data[int(self.offsets[start]) : int(self.offsets[end])]
        return view.view(end - start, settings.height, settings.width, 3)

    def to_arrow(self) -> pa.LargeBinaryArray:
        data = pa.py_buffer(self.data.numpy())  # the buffer keeps the tensor's memory alive
        return pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(self.offsets) - 1, [None, pa.py_buffer(self.offsets), data]
        )


class EncodeImages:
    """Raw pixels → encoded image bytes, their sha256 and size (CPU tasks)."""

    needs = ("pixels", "width", "height")

    def __init__(self, *, image_format: str, quality: int):
        self.image_format = image_format
        self.quality = quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns("encode", batch, self.needs)
        return encode_batch(batch, image_format=self.image_format, quality=self.quality)


class WriteParts:
    """Commits a part (images, then metadata) and returns one summary row for the driver."""

    needs = (
        "id",
        "image",
        "sha256",
        "bytes",
        "generation_seconds",
        "encode_seconds",
        "peak_memory_mb",
        "node",
        "actor",
    )

    def __init__(self, *, writer: PartWriter, job: str):
        """`writer`: built on the driver with the job's settings and metadata schema; it holds no
        connection (s3fs connects lazily), so it travels to the write tasks as it is."""
        self.job = job
        self.model_name = writer.model.model
        self.metrics: JobMetrics | None = None  # created in the worker (Ray metrics live there)
        self.writer = writer

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns("write", batch, self.needs)
        record = self.writer.write(batch)
        if self.metrics is None:
            self.metrics = JobMetrics(job=self.job, model=self.model_name)
        self.metrics.committed(record.rows, stages={"encode": record.encode_seconds, "upload": record.upload_seconds})
        # One row per part for the driver: its row count (progress) and its stats record.
        return pa.table({"rows": [record.rows], "record": [record.to_json()]})

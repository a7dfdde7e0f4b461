"""A small job on one machine, run in the driver's own process, without Ray.

A job's fixed cost on Ray is Ray's start (about 3 s on 2 CPUs), a worker process for the generator
that imports torch and diffusers again, Ray Data's start and its shutdown: on a 96-image job of
the tiny model that was 18 s against 8 s for a bare diffusers loop (benchmarks/results/overhead.md),
and scheduled increments and first tries are such jobs. Here the very same stages
(`run.stages`: read, generate, encode, write) run in this process: the generator on the calling
thread, each model call's images encoded and written on a thread beside it (parts commit as they
fill, as on Ray), the same parts, commits, statistics and lease. What Ray adds and this lacks: a
generator that crashes is not restarted (the job stops, committed parts are kept, the same
command resumes), more than one generator, and Ray's metrics.

`resources.in_process` chooses (`auto`: jobs of at most `IN_PROCESS_MAX_ROWS` images, one
generator, no Ray address, no fleet and no metrics port).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.output.stats import JobStats, PartStats
from pipeline.run.builder import encode_stage, generator_kwargs, read_stage, write_stage
from pipeline.run.fleet import GpuType, resolve_precision
from pipeline.run.progress import JobLine, ProgressBoard
from pipeline.run.session import QUIET_ENV
from pipeline.run.telemetry import local_gpus

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig
    from pipeline.plan.rows import RowPlan

logger = logging.getLogger(__name__)

IN_PROCESS_MAX_ROWS = 1000


def in_process_config(
    config: JobConfig, remaining: int, *, ray_address: str | None, metrics_port: int | None, tuning: bool
) -> tuple[JobConfig, str] | None:
    """The job's config resolved for this machine when it runs in this process (`resources.
    in_process`), with how `model.dtype: auto` was resolved; None when it runs on Ray."""
    setting = config.resources.in_process
    if setting is False or tuning or ray_address is not None or metrics_port is not None or config.fleet:
        return None
    if setting == "auto" and remaining > IN_PROCESS_MAX_ROWS:
        return None
    resources = config.resources
    if resources.actor_range[1] > 1:
        return None
    gpus, kind = local_gpus() if resources.gpus_per_actor != 0.0 else (0, "")
    per_actor = resources.gpus_per_actor if resources.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if resources.actors is None and per_actor and gpus / per_actor >= 2:
        return None  # one generator per GPU: that is Ray's to run
    if per_actor > max(gpus, 0):
        return None  # more GPU than this machine has: Ray waits for one (or says why it cannot)
    update = {"gpus_per_actor": per_actor, "actors": 1}
    config = config.model_copy(update={"resources": resources.model_copy(update=update)})
    types = {kind or "GPU": GpuType(kind or "GPU", gpus, 1, float(os.cpu_count() or 1))} if per_actor else {}
    return resolve_precision(config, types)


class _Direct:
    """A `ProgressBoard` that the generator calls as it would call the Ray actor (`board.add.remote(...)`)."""

    def __init__(self, board: ProgressBoard):
        self.board = board

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.board, name)
        return type("_Remote", (), {"remote": staticmethod(method)})


def execute_in_process(
    config: JobConfig,
    rows: RowPlan,
    remaining: int,
    stats: JobStats,
    *,
    line: JobLine,
    passthrough: pa.Schema,
    on_part: Callable[[PartStats], None] | None,
) -> None:
    """Render the pending rows here: read each task, render it one model call at a time, and
    encode and write each call's images on a thread while the next call renders."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # as on Ray's workers (`session.QUIET_ENV`)
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    from pipeline.run.stages import GenerateImages

    board = ProgressBoard()
    line.begin(remaining, actors=1, board=board)
    read = read_stage(config, passthrough, rows.masks)
    encode, write = encode_stage(config), write_stage(config, passthrough)
    direct: Any = _Direct(board)  # called as the Ray actor would be
    generator = GenerateImages(**generator_kwargs(config), progress=direct, in_process=True)
    part_rows, batch = config.write.rows_per_part, max(config.batch_sizes)
    waiting: list[pa.Table] = []  # encoded rows not yet in a part

    def commit(table: pa.Table) -> None:
        result = write(table)
        for row in result.to_pylist():
            record = PartStats.from_json(row["record"])
            if on_part is not None:
                on_part(record)
            stats.add_part(record)
            line.committed(int(row["rows"]))

    def encode_and_commit(rendered: pa.Table | None) -> None:
        """One call's images into the parts that they fill; None: the last part, however full."""
        if rendered is not None:
            waiting.append(encode(rendered))
        buffered = pa.concat_tables(waiting, promote_options="permissive") if waiting else None
        waiting.clear()
        if buffered is None:
            return
        offset = 0
        while buffered.num_rows - offset >= part_rows or (rendered is None and offset < buffered.num_rows):
            commit(buffered.slice(offset, part_rows))
            offset += part_rows
        if offset < buffered.num_rows:
            waiting.append(buffered.slice(offset))

    try:
        if generator.load_error is not None:
            raise generator.load_error
        _render(rows, read, generator, encode_and_commit, batch)
    finally:
        generator.close()


def _render(
    rows: RowPlan,
    read: Callable[[pa.Table], pa.Table],
    generator: Callable[[pa.Table], pa.Table],
    encode_and_commit: Callable[[pa.Table | None], None],
    batch: int,
) -> None:
    """Each read task's rows, one model call at a time; each call's images encoded and committed
    on a thread while the next call renders."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-batch-commit") as committer:
        previous: Future[None] | None = None
        for task in rows.read_tasks():
            table = read(pa.Table.from_pylist([task]))
            for start in range(0, table.num_rows, batch):
                rendered = generator(table.slice(start, batch))
                if previous is not None:
                    previous.result()  # in order, and a failed write stops the job here
                previous = committer.submit(encode_and_commit, rendered)
        if previous is not None:
            previous.result()
        committer.submit(encode_and_commit, None).result()

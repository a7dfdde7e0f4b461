"""Running a job from the driver: plan the manifest, record the job, stream the Ray Data graph,
show progress, and write `stats.json` once every part has committed."""

from __future__ import annotations

import logging
import math
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline import __version__
from pipeline.core.errors import ConfigError, SdxlBatchError, StorageError, error_from_text, exception_chain
from pipeline.core.io import filesystem, join
from pipeline.core.layout import (
    IMAGES_DIR,
    JOB_RECORD,
    METADATA_DIR,
    REJECTS_DIR,
    SHARDS_DIR,
    STATS_FILE,
    read_json,
    write_json,
)
from pipeline.output.lease import OutputLease
from pipeline.output.publish import publish
from pipeline.output.runs import output_figures, write_run
from pipeline.output.stats import JobStats, PartStats
from pipeline.plan.executor import LocalExecutor, PlanExecutor, RayExecutor
from pipeline.plan.job import (
    JobPlan,
    check_job,
    plan_job,
    raise_for_bad_rows,
    write_rejects,
)
from pipeline.plan.ledger import check_fingerprint, clear_output, recorded_fingerprint, settings_fingerprint
from pipeline.plan.manifest import list_manifest_files
from pipeline.plan.parts import move_aside
from pipeline.plan.rows import RowPlan
from pipeline.run.builder import LIGHT_STAGE_CPUS, GeneratorPool, ModelActors, build_dataset, model_info
from pipeline.run.crashes import watch_failed_stage, worker_death
from pipeline.run.fleet import cluster_gpu_types, resolve_fleet, resolve_precision
from pipeline.run.inprocess import execute_in_process, in_process_config
from pipeline.run.progress import JobLine, start_board, ticking
from pipeline.run.session import init_ray

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig

logger = logging.getLogger(__name__)

MIN_ACTOR_CPUS = 0.1  # the least CPU reservation per generator actor the fitting goes down to


@dataclass(frozen=True)
class JobResult:
    output: str
    rows: int
    wall_seconds: float
    images_per_second: float
    stats: dict[str, Any]  # the stats.json record
    job_stats: JobStats  # the totals it was made from (what `tune` and `estimate` measure)

    def locations(self) -> dict[str, str]:
        return {
            "images": join(self.output, IMAGES_DIR if self.stats["layout"] == "files" else SHARDS_DIR),
            "metadata": join(self.output, METADATA_DIR),
            "stats": join(self.output, STATS_FILE),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def resolve_resources(config: JobConfig, *, embedded: bool = False) -> JobConfig:
    """Fill the automatic placement from the cluster Ray is connected to: one GPU per actor when
    the cluster has GPUs (else CPU actors), and one actor per GPU (at least one). `embedded`: Ray
    runs on this machine alone (no `--address`), so what it lacks now it lacks for good."""
    import ray

    resources = config.resources
    cluster = ray.cluster_resources()
    gpus = float(cluster.get("GPU", 0.0))
    per_actor = resources.gpus_per_actor
    if per_actor is None:
        per_actor = 1.0 if gpus else 0.0
    actors = resources.actors
    if actors is None:
        actors = max(1, int(gpus / per_actor + 1e-9)) if per_actor and gpus else 1
    needed = per_actor * (resources.actor_range[0] if resources.actors else 1)
    if per_actor and gpus < needed:
        logger.warning(
            "the job asks for %g GPU(s) per actor and the cluster has %g GPU(s) now: its actors wait until an "
            "autoscaler adds GPU nodes (or set resources.actors / gpus_per_actor to fit)",
            per_actor,
            gpus,
        )
    update = {"gpus_per_actor": per_actor, "actors": actors}
    update["cpus_per_actor"] = _fit_actor_cpus(config, actors, float(cluster.get("CPU", 0.0)), embedded=embedded)
    return config.model_copy(update={"resources": resources.model_copy(update=update)})


def _fit_actor_cpus(config: JobConfig, actors: int | tuple[int, int], cpus: float, *, embedded: bool) -> float:
    """CPUs to reserve per generator actor so that its minimum count leaves one task of every
    light stage (read, encode, write: LIGHT_STAGE_CPUS together) room to run at once. When the
    actors took every CPU, Ray Data waited for ever without a word (measured: 2 actors x 1 CPU on
    2 CPUs, 10 min); when they left less than the sum, the write stage waited for every read to
    finish (builder.LIGHT_STAGE_CPUS). The default (1 CPU) is lowered to fit; a value the user set
    is theirs: an error on an embedded Ray, a warning on a cluster (an autoscaler may add CPU
    nodes)."""
    resources = config.resources
    reserved = resources.cpus_per_actor
    count = actors[0] if isinstance(actors, tuple) else actors
    if count * reserved + LIGHT_STAGE_CPUS <= cpus + 1e-9:
        return reserved
    fit = math.floor(100 * (cpus - LIGHT_STAGE_CPUS) / count) / 100
    short = (
        f"{count} generator actor(s) x {reserved:g} CPU (resources.cpus_per_actor) leave less than the "
        f"{LIGHT_STAGE_CPUS:g} CPU that reading, encoding and writing need of the cluster's {cpus:g} CPU(s)"
    )
    if "cpus_per_actor" not in resources.model_fields_set and fit >= MIN_ACTOR_CPUS:
        logger.info("%s: reserving %g CPU per actor instead", short, fit)
        return fit
    if fit >= MIN_ACTOR_CPUS:
        advice = f"set resources.cpus_per_actor to {fit:g} or less"
    elif count > 1:
        advice = "run fewer actors"
    else:
        advice = f"run it where Ray has at least {LIGHT_STAGE_CPUS + MIN_ACTOR_CPUS:g} CPUs"
    if embedded:
        raise ConfigError(f"{short}, so the job could never start: {advice} (or resources.actors)")
    logger.warning("%s: the job waits until an autoscaler adds CPUs (or %s)", short, advice)
    return reserved


SLICES_PER_ACTOR = 64  # a job gives each actor at least this many slices before slices grow
MAX_SLICE_CALLS = 32  # model calls per slice at most (256 rows at batch 8)


def read_slice_rows(remaining: int, config: JobConfig) -> int:
    """Rows per block reaching the generators: a whole number of model calls (of the largest
    batch size), one call for all but large jobs.

    An actor task renders one block, and its images leave the actor only when the task ends (Ray
    Data buffers a task's outputs up to 128 MiB: some 40 images at 1024², all of a slice for small
    ones). So a slice is what a job waits for before its first encode and commit, and what a crash
    or a lost node can cost (2 in flight per actor). One call per slice: parts commit as calls
    return, from the job's first minute. Large jobs take slices of more calls, so that each actor
    still gets `SLICES_PER_ACTOR` of them and the driver schedules few tasks: at 1,000 GPUs making
    10 images/s each, slices of one call of 8 would be 1,250 generate tasks a second (and as many
    encode tasks) for one Ray Data driver; of 32 calls (256 rows) 39. The first part of such a job
    commits after one slice per actor, about 40 s of GPU time at 1.2 s per call."""
    batch = max(config.batch_sizes)
    calls = -(-remaining // (config.resources.max_actors * batch * SLICES_PER_ACTOR))
    return batch * min(max(calls, 1), MAX_SLICE_CALLS)


LOCAL_PLANNING_BYTES = 16 * 2**20


def planning_executor(config: JobConfig, ray_address: str | None, *, metrics_port: int | None = None) -> PlanExecutor:
    """Where the job is planned (`plan.rows`): as Ray tasks on the cluster when the driver joins
    one, or when the manifest is larger than LOCAL_PLANNING_BYTES of Parquet (an embedded Ray
    starts for it, as for rendering); else in this process, without starting Ray at all."""
    if ray_address is None:
        _, _, _, sizes = list_manifest_files(
            config.manifest, config.storage, sizes=True, manifest_format=config.manifest_format
        )
        if sum(sizes) <= LOCAL_PLANNING_BYTES:
            return LocalExecutor()
    init_ray(ray_address, metrics_port=metrics_port)
    return RayExecutor()


LOCAL_OUTPUT_PARTS = 256  # committed parts checked in this process; more start Ray (some 5 s)


def output_executor(parts: int, ray_address: str | None) -> PlanExecutor:
    """Where `verify` checks (and `report` reads) an output of `parts` committed parts: as Ray tasks on the cluster
    when the driver joins one, or when it has more than LOCAL_OUTPUT_PARTS (an embedded Ray
    starts, whose workers use every core); else in this process."""
    if ray_address is None and parts <= LOCAL_OUTPUT_PARTS:
        return LocalExecutor()
    init_ray(ray_address)
    return RayExecutor()


def resolve_job(config: JobConfig, *, embedded: bool) -> tuple[JobConfig, str]:
    """What a job needs to know of the cluster Ray is connected to: its fleet's GPUs (`run.fleet`),
    its placement (`resolve_resources`) and the one precision of every actor (`model.dtype: auto`
    resolved for the job's GPU types). Returns the config and how `auto` was resolved ("": set)."""
    on_gpu_cluster = config.fleet or config.resources.gpus_per_actor != 0.0
    types = cluster_gpu_types() if on_gpu_cluster else {}
    if config.fleet:
        config = resolve_fleet(config, types)
    config = resolve_resources(config, embedded=embedded)
    return resolve_precision(config, types)


def run_job(
    config: JobConfig,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    metrics_port: int | None = None,
    generate: ModelActors | None = None,
    on_part: Callable[[PartStats], None] | None = None,
    takeover: bool = False,
    line: JobLine | None = None,
) -> JobResult:
    """Render every unfinished row of the manifest into the output; returns where the results are.

    The job is validated first (`plan_job`), before Ray starts. Rows that committed parts
    already list are skipped before they reach a GPU (resume and incremental runs); bad rows
    stop the job or, with `on_bad_row: skip`, go to rejects/; `overwrite` discards the output's
    previous results first.

    `generate`: model actors already loaded (`tune`), in place of the job's own pool; `config`
    then has its placement resolved. `on_part`: called with each part's stats record as it commits.

    The job holds the output's lease from planning to its end (`output.lease`: one writer per
    output); `takeover` takes it from a holder that is not known to be dead. `line`: the
    console's progress line (default: one on standard error, shown when `progress`).
    """
    clock = WallClock(time.perf_counter())
    started_at = _now()
    line = line or JobLine(enabled=progress)
    with ticking(line):
        try:
            line.phase("checking the job")
            check_job(config)  # the config's own mistakes stop it before Ray starts
            fs, root = filesystem(config.output, config.storage)
            command = "run --overwrite" if overwrite else "run"
            lease = OutputLease(fs, root, command=command, expiry_s=config.write.lease_expiry_s, takeover=takeover)
            with lease:
                return _run_holding(
                    config, lease, clock=clock, started_at=started_at, ray_address=ray_address, line=line,
                    overwrite=overwrite, metrics_port=metrics_port, generate=generate, on_part=on_part,
                )  # fmt: skip
        finally:
            line.finish()


def _run_holding(
    config: JobConfig,
    lease: OutputLease,
    *,
    clock: WallClock,
    started_at: str,
    ray_address: str | None,
    line: JobLine,
    overwrite: bool,
    metrics_port: int | None,
    generate: ModelActors | None,
    on_part: Callable[[PartStats], None] | None,
) -> JobResult:
    """`run_job`'s work, with the output's lease held."""
    line.phase("planning the manifest")
    executor = planning_executor(config, ray_address, metrics_port=metrics_port)
    job = plan_job(config, overwrite=overwrite, executor=executor)
    raise_for_bad_rows(job)
    clock.mark("planning")
    plan = job.manifest
    fs, root = lease.fs, lease.root
    previous = None if overwrite else read_json(fs, join(root, JOB_RECORD))
    if overwrite:
        clear_output(config)
    elif plan.damaged_parts:  # unreadable committed parts: their rows were planned as pending
        moved = move_aside(fs, root, plan.damaged_parts)
        logger.warning(
            "moved %d damaged committed part(s) aside to %s (%s): their rows are rendered again",
            len(moved),
            posixpath.dirname(moved[0]),
            "; ".join(f"{posixpath.basename(path)}: {why}" for path, why in plan.damaged_parts[:5]),
        )
    rejects = write_rejects(job)
    if plan.problem_count:
        logger.warning(
            "skipping %d bad row(s) of the manifest (on_bad_row: skip); they are listed with their reasons in %s",
            plan.problem_count,
            join(job.output, REJECTS_DIR),
        )
    remaining = job.pending_rows
    fingerprint = job.fingerprint
    local = None
    if remaining:
        local = in_process_config(
            config, remaining, ray_address=ray_address, metrics_port=metrics_port, tuning=generate is not None
        )
        if local is not None:
            resolved, why = local
        else:
            line.phase("starting Ray" if ray_address is None else "joining the Ray cluster")
            init_ray(ray_address, metrics_port=metrics_port)
            clock.mark("starting_ray")
            resolved, why = (config, "") if generate else resolve_job(config, embedded=ray_address is None)
        fingerprint = settings_fingerprint(resolved)
        if previous and job.done_rows:  # the precision and VAE, now that the job's GPUs are known
            check_fingerprint(previous.get("fingerprint"), fingerprint, job.output, resolved=why)
        config = resolved
    write_json(fs, join(root, JOB_RECORD), {
        "version": __version__,
        "started_at": started_at,
        "fingerprint": recorded_fingerprint(previous.get("fingerprint") if previous else None, fingerprint),
        "manifest_files": plan.files,
        "manifest_rows": plan.total_rows,
        "config": job.config.model_dump(mode="json"),  # SecretStr fields dump as '**********'
    })  # fmt: skip
    stats = JobStats()
    if remaining:
        logger.info("%d of %d rows to render (%d already done)", remaining, plan.total_rows, job.done_rows)
        if local is not None:
            logger.info("a small job on one generator: rendering in this process, without Ray (resources.in_process)")
            execute_in_process(
                config, job.manifest, remaining, stats, line=line, passthrough=job.passthrough, on_part=on_part
            )
            clock.generators(stats)
        else:
            _execute(
                config, job.manifest, remaining, stats, line=line, passthrough=job.passthrough,
                generate=generate, on_part=on_part, clock=clock,
            )  # fmt: skip
    line.phase("finishing")
    lease.check()  # another writer took over: its unfinished files are not ours to remove
    _publish(config, job.output)
    wall = clock.elapsed()
    _warn_about_limits(stats)
    breakdown = clock.breakdown(wall)
    extra = _job_settings(job, config, rejects=len(rejects)) | {
        "started_at": started_at, "finished_at": _now(), "wall_breakdown_seconds": breakdown,
        "runner": "in_process" if local is not None else "ray",
        "rendering_images_per_second": round(stats.totals.rows / breakdown["rendering"], 4)
        if breakdown["rendering"] > 0 else 0.0,
    }  # fmt: skip
    record = stats.to_dict(wall_seconds=wall, manifest_rows=plan.total_rows, extra=extra)
    if stats.totals.rows:  # a run that rendered nothing leaves the output's figures as they were
        write_run(fs, root, record)
        record["output"] = output_figures(fs, root)
        write_json(fs, join(root, STATS_FILE), record)
    return JobResult(
        output=job.output,
        rows=stats.totals.rows,
        wall_seconds=wall,
        images_per_second=record["images_per_second"],
        stats=record,
        job_stats=stats,
    )


def _publish(config: JobConfig, output: str) -> None:
    """The dataset card, shard list or imagefolder index, and no orphans (`output.publish`)."""
    fs, root = filesystem(config.output, config.storage)
    try:
        published = publish(
            fs,
            root,
            layout=config.write.layout,
            image_format=config.generation.image_format,
            captions=config.write.captions,
        )
    except (OSError, pa.ArrowException) as error:
        raise StorageError(
            f"the parts are committed, but writing the dataset card under {output} failed: "
            f"{type(error).__name__}: {error}. Rerun the same command to write it."
        ) from error
    if published is not None:
        logger.info("dataset card written: datasets.load_dataset(%r) reads the %d rows", output, published.rows)


def _job_settings(job: JobPlan, config: JobConfig, *, rejects: int) -> dict[str, Any]:
    """What `stats.json` records beside the measurements: skipped rows and the job's settings."""
    plan, model = job.manifest, model_info(config)
    return {
        "rows_done_before": job.done_rows,
        "rows_rejected": plan.problem_count,
        "rows_skipped": job.done_rows + plan.problem_count,
        "rejected_by_column": dict(plan.problem_columns),
        "rejects_files": rejects,
        "layout": config.write.layout,
        "image_format": config.generation.image_format,
        "model": model.model,
        "scheduler": model.scheduler,
        "batch_size": config.generation.batch_size,
        "actors": config.resources.actors,
        "gpus_per_actor": config.resources.gpus_per_actor,
        "dtype": config.model.dtype,  # resolved for the job's GPUs when it rendered (`auto` when it did not)
        "fleet": {name: t.model_dump(exclude_none=True) for name, t in config.fleet.items()} or None,
    }


def _warn_about_limits(stats: JobStats) -> None:
    """One warning per kind for the whole job, with counts (the metadata has the per-row record)."""
    totals = stats.totals
    if totals.prompts_truncated or totals.negative_prompts_truncated:
        logger.warning(
            "%d prompt(s) and %d negative prompt(s) were longer than the text encoders' 77-token limit and were "
            "truncated (metadata columns prompt_truncated / prompt_tokens)",
            totals.prompts_truncated,
            totals.negative_prompts_truncated,
        )
    if totals.oom_retries:
        logger.warning(
            "out of memory %d time(s): batches were split and retried, down to %d images per model call; "
            "a smaller generation.batch_size avoids the retries",
            totals.oom_retries,
            totals.min_render_batch_size,
        )


def _execute(
    config: JobConfig,
    rows: RowPlan,
    remaining: int,
    stats: JobStats,
    *,
    line: JobLine,
    passthrough: pa.Schema,
    generate: ModelActors | None,
    on_part: Callable[[PartStats], None] | None,
    clock: WallClock,
) -> None:
    """Stream the Ray Data graph over the pending read tasks, counting parts as they commit."""
    board = start_board() if line.enabled and generate is None else None
    line.begin(remaining, actors=config.resources.actor_range[1], board=board)
    dataset = build_dataset(
        config,
        rows.read_tasks(),
        masks=rows.masks,
        slice_rows=read_slice_rows(remaining, config),
        passthrough=passthrough,
        generate=generate or GeneratorPool(progress=board),
    )
    with watch_failed_stage() as failed:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                assert isinstance(batch, pa.Table)
                for row in batch.to_pylist():
                    record = PartStats.from_json(row["record"])
                    if on_part is not None:
                        on_part(record)
                    stats.add_part(record)
                    line.committed(int(row["rows"]))
            clock.generators(stats)
        except Exception as error:
            cause = user_error(error) or worker_death(error, max_retries=config.resources.max_retries, failed=failed)
            if cause is not None:
                raise cause from None
            raise


def user_error(error: BaseException) -> SdxlBatchError | None:
    """Find our own error inside the exceptions Ray wraps around a failed task."""
    for current in exception_chain(error):
        if isinstance(current, SdxlBatchError):
            # Ray Data appends its retry advice to the message; the user needs ours alone.
            message = str(current).split("\nFailed to apply UDF transform")[0]
            return current if message == str(current) else type(current)(message)
    return _error_in_text(error)


def _error_in_text(error: BaseException) -> SdxlBatchError | None:
    """Our error as Ray reports an actor whose constructor failed: Ray's ActorDiedError keeps
    only the text of the original exception, its traceback ending with `…ModelError: <message>`."""
    for current in exception_chain(error):
        found = error_from_text(str(current))
        if found is not None:
            return found
    return None


class WallClock:
    """Where a job's wall time went: planning, starting Ray, starting the generators (actors'
    start, model load and the first model call), rendering (first image to last commit) and
    finishing (publishing the output and its statistics). Marks are seconds since the start
    (`time.perf_counter`); the generators' first and last calls are epoch seconds."""

    PHASES = ("planning", "starting_ray", "starting_generators", "rendering", "finishing")

    def __init__(self, start: float) -> None:
        self.start = start
        self.epoch_offset = time.time() - time.perf_counter()  # perf_counter -> epoch
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.perf_counter() - self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def generators(self, stats: JobStats) -> None:
        """The first image (the end of the first model call of any actor) and the end of rendering
        (now: the last part has committed)."""
        first = min((w.first_end for w in stats.workers.values()), default=math.inf)
        if math.isfinite(first):
            self.marks["first_image"] = first - self.epoch_offset - self.start
        self.marks["rendering"] = self.elapsed()

    def breakdown(self, wall: float) -> dict[str, float]:
        """Seconds per phase (`PHASES`), adding up to `wall`; phases a run did not have are 0."""
        edges = [0.0]
        for phase in ("planning", "starting_ray", "first_image", "rendering"):
            edges.append(max(edges[-1], min(self.marks.get(phase, edges[-1]), wall)))
        edges.append(wall)
        return {name: round(b - a, 3) for name, a, b in zip(self.PHASES, edges, edges[1:], strict=False)}

"""`sdxl-batch tune`: every GPU of the cluster tunes at once, per GPU type, on Ray Tune.

The driver finds the cluster's GPU types (`run.fleet.cluster_gpu_types`), samples the job's
manifest, and hands Ray Tune a searcher (`TuneSearcher`, over `plan.TunePlan`) and a trainable
(`trial.load_trial`) whose resources are one placement-group bundle per trial: a GPU, the CPUs a
GPU of its node gets in a real job, and a sliver of its type's `accelerator_type` resource, which
pins it to a node of that type. Ray Tune runs up to one trial per GPU at once and schedules them;
nothing here decides where a trial runs. On a machine without GPUs the only "type" is the machine
(`CPU`), one trial at a time, as before.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
from ray.tune import Callback
from ray.tune.search import Searcher

from pipeline.commands.tuning.cache import TuneCache, library_versions
from pipeline.commands.tuning.plan import LoadRequest, TunePlan
from pipeline.commands.tuning.points import FAILED, Load
from pipeline.commands.tuning.quality import QUALITY_ROWS, QualityGate, QualityJudge
from pipeline.commands.tuning.results import TuneSummary
from pipeline.commands.tuning.sample import sample_digest, sample_groups, sample_manifest
from pipeline.commands.tuning.space import CPU, SearchSpace
from pipeline.commands.tuning.trial import TrialContext, load_trial, request_of, trial_config
from pipeline.core.accelerators import RESOURCE_PREFIX
from pipeline.core.errors import ConfigError
from pipeline.models.weights import default_cache_dir
from pipeline.plan.job import plan_job
from pipeline.plan.ledger import settings_fingerprint
from pipeline.run.builder import model_info
from pipeline.run.fleet import TYPE_SHARE, GpuType, cluster_gpu_types
from pipeline.run.runner import planning_executor
from pipeline.run.session import init_ray

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig

logger = logging.getLogger(__name__)

SEARCH_MODES = ("quick", "grid")


@dataclass
class TuneOptions:
    """Everything about a `tune` run that is not the job's config or the searched space."""

    work_dir: Path
    search: str = "quick"
    types: list[str] | None = None
    sample: int | None = None
    prices: dict[str, float] = field(default_factory=dict)
    default_price: float | None = None
    best_config: Path | None = None
    cache_dir: Path | None = None
    fresh: bool = False
    max_concurrent: int | None = None  # trials at once; default one per GPU
    max_memory_fraction: float | None = None
    min_images_per_second: float | None = None
    gate: QualityGate = field(default_factory=QualityGate)
    progress: bool = True
    config_path: str | None = None


@dataclass
class TuneRun:
    """What the driver learned, for `outputs` to write."""

    config: JobConfig
    options: TuneOptions
    space: SearchSpace
    types: dict[str, GpuType]
    summary: TuneSummary
    sample_rows: int
    sample_groups: list[dict[str, Any]]
    pending_rows: int
    started_at: float
    ended_at: float
    cache_hits: int
    fingerprint: dict[str, Any]
    versions: dict[str, str]


def tune_types(requested: list[str] | None) -> dict[str, GpuType]:
    """The GPU types to tune: the cluster's (all, or `--types`), or this machine without GPUs."""
    import ray

    found = cluster_gpu_types()
    if not found:
        if requested and requested != [CPU]:
            raise ConfigError(f"--types {','.join(requested)}: the cluster has no GPUs; tune runs on its CPUs")
        cpus = int(ray.cluster_resources().get("CPU", 1.0))
        return {CPU: GpuType(CPU, 1, 1, float(cpus))}
    if not requested:
        return found
    unknown = [name for name in requested if name not in found]
    if unknown:
        have = ", ".join(f"{t.gpus} x {name}" for name, t in found.items())
        raise ConfigError(f"--types: the cluster has no {', '.join(unknown)} GPUs (it has {have})")
    return {name: found[name] for name in requested}


def load_bundle(accelerator_type: str, types: dict[str, GpuType]) -> dict[str, float]:
    """A trial's placement-group bundle: a GPU of its type and the CPUs such a GPU gets on its
    node in a real job (on a machine without GPUs: every CPU of it)."""
    kind = types[accelerator_type]
    resources = {"CPU": kind.cpus_per_gpu}
    if accelerator_type == CPU:
        return resources
    resources["GPU"] = 1.0
    if accelerator_type != "GPU":
        resources[f"{RESOURCE_PREFIX}{accelerator_type}"] = TYPE_SHARE
    return resources


def default_work(kind: str, config_path: str | None) -> Path:
    """`outputs/<kind>/<config's stem>`: where `tune` and `estimate` write by default."""
    stem = Path(config_path).stem if config_path else "job"
    return Path("outputs") / kind / stem


def default_sample_rows(space: SearchSpace) -> int:
    """A warm-up call and four steady calls of the largest batch on every actor of a GPU."""
    return 5 * max(space.batches.batch_sizes) * max(space.actors_per_gpu)


def run_tune(
    config: JobConfig, flags: dict[str, str | None], options: TuneOptions, *, ray_address: str | None
) -> TuneRun:
    """Tune the job's settings on the cluster (see the module docstring)."""
    if options.search not in SEARCH_MODES:
        raise ConfigError(f"--search: {options.search!r}; one of {', '.join(SEARCH_MODES)}")
    started = time.time()
    executor = planning_executor(config, ray_address)
    init_ray(ray_address)
    _start_ray_data_actors()
    types = tune_types(options.types)
    space = SearchSpace.parse(on_gpu=CPU not in types, flags=flags)
    job = plan_job(config, executor=executor)
    rows = options.sample or default_sample_rows(space)
    sample = sample_manifest(job, rows)
    quality_rows = min(QUALITY_ROWS, sample.num_rows)
    buffer = io.BytesIO()
    pq.write_table(sample, buffer)
    versions = library_versions()
    fingerprint = settings_fingerprint(config)
    common = {
        "model": model_info(config).weights,
        "preset": config.model.preset,
        "fingerprint": {k: v for k, v in fingerprint["settings"].items() if not k.startswith("model.")},
        "sample": sample_digest(sample, quality_rows),
        "versions": {k: v for k, v in versions.items() if k != "sdxl-batch"},
        "quality": [options.gate.metric, options.gate.threshold],
        "max_memory_fraction": options.max_memory_fraction,
        "cpus_per_actor": config.resources.cpus_per_actor,
    }
    cache = TuneCache(
        options.cache_dir or default_cache_dir(config.model.cache_dir) / "tune", common, fresh=options.fresh
    )
    plan = TunePlan({name: kind.gpus for name, kind in types.items()}, space, mode=options.search)
    judge = _judge(options.gate)
    context = TrialContext(config, buffer.getvalue(), judge, options.search, quality_rows, options.max_memory_fraction)
    searcher = TuneSearcher(plan, cache, options.search, judge)
    _fit(context, searcher, types, options)
    summary = TuneSummary(plan.loads(), {name: kind.gpus for name, kind in types.items()})
    _final_verdicts(summary.loads, judge, cache, options.search, plan)
    summary.decide(min_images_per_second=options.min_images_per_second)
    return TuneRun(
        config=config, options=options, space=space, types=types, summary=summary, sample_rows=sample.num_rows,
        sample_groups=sample_groups(sample), pending_rows=job.pending_rows, started_at=started, ended_at=time.time(),
        cache_hits=cache.hits, fingerprint=fingerprint, versions=versions,
    )  # fmt: skip


class _Identity:
    def __call__(self, batch: Any) -> Any:
        return batch


def _start_ray_data_actors() -> None:
    """Ray Data's cluster-wide actors (its stats actor, the actor-location tracker of its actor
    pools, its usage and autoscaling actors: detached, named, one per cluster) are started by the
    first process that runs a dataset. From inside a trial they would be started in the trial's
    placement group (Tune's bundles capture their child tasks) and die when that trial ends, under
    another trial's dataset (seen: `ActorUnschedulableError` in 1 or 2 of 8 loads on four logical
    GPUs, from the tracker, restarted into a removed placement group). One row through an actor
    stage, here on the driver, starts them outside every placement group."""
    import ray.data

    ray.data.range(1).map_batches(_Identity, concurrency=1, num_cpus=0).materialize()


def _judge(gate: QualityGate) -> Any:
    import ray

    return ray.remote(QualityJudge).options(num_cpus=0).remote(gate)


def _fit(context: TrialContext, searcher: TuneSearcher, types: dict[str, GpuType], options: TuneOptions) -> None:
    """Ray Tune runs the trials: up to one per GPU at once, each in its type's bundle."""
    # Ray Tune's own console output (its tables, its experiment box) and loggers: our progress line,
    # table and tune.json say what the user needs; Tune's JSON results stay in the work dir.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    gpus = options.max_concurrent or sum(kind.gpus for kind in types.values())

    def resources(config: dict[str, Any]) -> Any:
        # An empty first bundle: the trial's own process takes nothing; its actors and tasks take the GPU's bundle.
        bundle = load_bundle(config["accelerator_type"], types)
        return tune.PlacementGroupFactory([{}, bundle], strategy="STRICT_PACK")

    trainable = tune.with_resources(tune.with_parameters(load_trial, context=context), resources=resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=gpus,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((options.work_dir / "ray-tune").resolve()),
            verbose=0,
            callbacks=[JsonLoggerCallback(), TuneProgress(searcher, enabled=options.progress)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()


def _trial_name(trial: Any) -> str:
    """`<type>-<load key>-<trial id>`: Tune's own names spell out the whole config."""
    config = trial.config
    try:
        key = request_of(config).load.key
    except (KeyError, TypeError):
        key = "load"
    return f"{config.get('accelerator_type', 'trial')}-{key}-{trial.trial_id}"


def _final_verdicts(loads: list[Load], judge: Any, cache: TuneCache, mode: str, plan: TunePlan) -> None:
    """The quality verdicts a load could not have when it ended (its reference came later), and
    each reference's pixels for the cache (a rerun judges new loads against them)."""
    import ray

    for load in loads:
        if load.quality is None and not load.cached:
            load.quality = ray.get(judge.verdict.remote(load.accelerator_type, load.load.key))
    for name, search in plan.searches.items():
        reference = search.results.get(search.reference)
        if reference is None or reference.cached:
            continue
        pixels = ray.get(judge.reference_pixels.remote(name))
        if pixels is not None:
            cache.put_pixels(search.requests[search.reference], mode, pixels)


class TuneSearcher(Searcher):  # type: ignore[misc]
    """Ray Tune's searcher over `plan.TunePlan`: suggests the next load (round robin over the types
    with a free GPU), serves cached loads without a trial, and records each trial's load."""

    def __init__(self, plan: TunePlan, cache: TuneCache, mode: str, judge: Any):
        super().__init__(metric="images_per_second", mode="max")
        self.plan, self.cache, self.tune_mode, self.judge = plan, cache, mode, judge
        self.requests: dict[str, LoadRequest] = {}
        self.cached_loads = 0

    def _cached(self, request: LoadRequest) -> Load | None:
        load = self.cache.get(request, self.tune_mode)
        if load is None:
            return None
        if request.reference:  # new loads of its type are judged against its cached pixels
            import ray

            pixels = self.cache.pixels(request, self.tune_mode)
            if pixels is None:
                return None
            ray.get(self.judge.submit.remote(request.accelerator_type, request.load.key, pixels, reference=True))
        self.cached_loads += 1
        return load

    def suggest(self, trial_id: str) -> dict[str, Any] | None:  # or FINISHED, a str, as Ray's own searchers do
        request = self.plan.next(self._cached)
        if request is None:
            return self.FINISHED if self.plan.finished else None  # type: ignore[return-value]
        self.requests[trial_id] = request
        return trial_config(request)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        request = self.requests.pop(trial_id, None)
        if request is None:
            return
        if result and "load" in result:
            load = Load.from_dict(json.loads(result["load"]))
        else:
            load = Load(trial_id, request.accelerator_type, request.load, status=f"{FAILED}: the trial's process died")
            load.reference, load.in_space = request.reference, request.in_space
        load.load_id = trial_id
        self.plan.record(load)
        self.cache.put(request, self.tune_mode, load)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing to save: a `tune` run is not resumed; a rerun takes what ran from the cache."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Loads done (cached included) and running per type, for the progress line."""
        return {
            name: {"done": len(search.results), "running": len(search.running)}
            for name, search in self.plan.searches.items()
        }


class TuneProgress(Callback):  # type: ignore[misc]
    """One live line on stderr: loads done/running/queued per type, at most once a second."""

    def __init__(self, searcher: TuneSearcher, *, enabled: bool):
        self.searcher, self.enabled = searcher, enabled
        self.shown = 0.0
        self.started = time.monotonic()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not self.enabled or time.monotonic() - self.shown < 1.0:
            return
        self.shown = time.monotonic()
        queued: dict[str, int] = {}
        for trial in trials:
            if trial.status == "PENDING":
                name = trial.config.get("accelerator_type", "?")
                queued[name] = queued.get(name, 0) + 1
        parts = []
        for name, count in self.searcher.counts().items():
            running = count["running"] - queued.get(name, 0)
            parts.append(f"{name}: {count['done']} done, {max(running, 0)} running, {queued.get(name, 0)} queued")
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\rtuning: loads {' | '.join(parts)} | {elapsed:.0f} s ")
        sys.stderr.flush()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


__all__ = ["TuneOptions", "TuneRun", "request_of", "run_tune"]

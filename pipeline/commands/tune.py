"""`sdxl-batch tune` and `sdxl-batch estimate`: measured throughput, time and cost.

Both measure by running the real job (`run_job`, the same graph, actors and writer) on a sample
of the manifest in a scratch output, and read the figures of its `stats.json` from the run's
`JobStats`. Throughput is the *steady* rate: each actor's images/s after its first model call
(which pays CUDA warm-up and torch.compile), summed over the actors. Model loading and Ray
start-up are reported separately as the start-up time.

A trial uses one GPU (or this one machine on CPU), so its images/s are per GPU; the written
config scales the actor count to the job's GPUs (`resources.actors * resources.gpus_per_actor`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.core.errors import ConfigError, ModelError, SdxlBatchError
from pipeline.plan.job import JobPlan, human_duration, plan_job
from pipeline.plan.ledger import settings_fingerprint
from pipeline.plan.manifest import rules_for
from pipeline.plan.rows import iter_pending
from pipeline.run.runner import JobResult, resolve_resources, run_job
from pipeline.run.session import init_ray

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig

logger = logging.getLogger(__name__)

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "auto": "auto"}
DTYPE_NAMES.update({name: name for name in list(DTYPE_NAMES.values())})
TUNE_RESULT = "tune.json"
BEST_CONFIG = "best.yaml"


def prepare(config: JobConfig, ray_address: str | None) -> JobConfig:
    """Connect to Ray (as `run` does) and resolve the job's automatic placement."""
    init_ray(ray_address)
    return resolve_resources(config, embedded=ray_address is None)


def on_gpu(config: JobConfig) -> bool:
    return config.resources.on_gpu


def job_gpus(config: JobConfig) -> float:
    """GPUs the job uses at most (the cost unit); 1 machine on CPU."""
    resources = config.resources
    return resources.max_actors * (resources.gpus_per_actor or 0.0) if resources.on_gpu else 1.0


@dataclass(frozen=True)
class Trial:
    batch_size: int
    actors_per_gpu: int
    dtype: str
    compile: bool

    @property
    def name(self) -> str:
        return f"b{self.batch_size}-a{self.actors_per_gpu}-{self.dtype}-{'compiled' if self.compile else 'eager'}"

    def apply(self, config: JobConfig) -> JobConfig:
        """The job config with this trial's settings, on one GPU (or this machine on CPU)."""
        resources: dict[str, Any] = {"actors": self.actors_per_gpu}
        if on_gpu(config):
            resources["gpus_per_actor"] = 1.0 / self.actors_per_gpu
        else:
            # Actors sharing the machine's cores split its threads.
            resources["torch_threads"] = max(1, (os.cpu_count() or 1) // self.actors_per_gpu)
        return config.model_copy(
            update={
                "generation": config.generation.model_copy(update={"batch_size": self.batch_size}),
                "resources": config.resources.model_copy(update=resources),
                "model": config.model.model_copy(update={"dtype": self.dtype, "compile": self.compile}),
            }
        )


def _split(text: str | None, default: list[Any], convert: Any, what: str) -> list[Any]:
    if text is None:
        return default
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(convert(item))
        except (ValueError, KeyError):
            raise ConfigError(f"--{what}: cannot read {item!r} (a comma-separated list, e.g. {default})") from None
    if not values:
        raise ConfigError(f"--{what}: no values given")
    return list(dict.fromkeys(values))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _switch(text: str) -> bool:
    return {"on": True, "off": False, "true": True, "false": False}[text.lower()]


def _dtype(text: str) -> str:
    return DTYPE_NAMES[text.lower()]


@dataclass(frozen=True)
class SweepSpace:
    batch_sizes: list[int]
    actors_per_gpu: list[int]
    dtypes: list[str]
    compile: list[bool]

    @classmethod
    def parse(
        cls,
        config: JobConfig,
        *,
        batch_sizes: str | None = None,
        actors_per_gpu: str | None = None,
        dtypes: str | None = None,
        compile: str | None = None,
    ) -> SweepSpace:
        """The sweep from the CLI's comma-separated lists; defaults depend on GPU or CPU."""
        gpu = on_gpu(config)
        space = cls(
            batch_sizes=_split(batch_sizes, [1, 2, 4, 8], _positive, "batch-sizes"),
            actors_per_gpu=_split(actors_per_gpu, [1, 2] if gpu else [1], _positive, "actors-per-gpu"),
            dtypes=_split(dtypes, ["float16", "bfloat16"] if gpu else ["float32"], _dtype, "dtypes"),
            compile=_split(compile, [False, True] if gpu else [False], _switch, "compile"),
        )
        if not gpu and "float16" in space.dtypes:
            raise ConfigError("--dtypes: float16 needs a GPU (resources.gpus_per_actor > 0); use fp32 or bf16 on CPU")
        return space

    def trials(self) -> list[Trial]:
        return [
            Trial(b, a, d, c)
            for d, c, a, b in itertools.product(self.dtypes, self.compile, self.actors_per_gpu, self.batch_sizes)
        ]


@dataclass
class TrialResult:
    trial: Trial
    status: str  # "ok", or why the trial does not count (out of memory, failed)
    images_per_second: float = 0.0  # steady, per GPU (per machine on CPU)
    seconds_per_image: float = 0.0
    peak_memory_mb: float = 0.0
    startup_seconds: float = 0.0
    rows: int = 0
    oom_retries: int = 0
    cost_per_1000: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        measured = {k: v for k, v in asdict(self).items() if k != "trial"}
        return {"name": self.trial.name, **asdict(self.trial), **measured}


def cost_per_1000(images_per_second: float, price: float | None) -> float | None:
    """Price of 1,000 images on one GPU (one machine on CPU) at `price` per hour."""
    if price is None or images_per_second <= 0:
        return None
    return price * 1000 / (images_per_second * 3600)


def measure(result: JobResult) -> tuple[float, float, float]:
    """(steady images/s, start-up seconds, peak memory MB) of a run, as its stats.json has them."""
    stats = result.job_stats
    rate = stats.steady_images_per_second() or stats.generation_images_per_second()
    startup = max(0.0, round(result.wall_seconds, 3) - stats.generation_span_seconds())
    memory = stats.peak_gpu_memory_mb() or stats.peak_memory_mb()
    return rate, startup, memory


def sample_manifest(job: JobPlan, rows: int, path: Path) -> int:
    """Write `rows` rows still to render (valid ones, in manifest order) as a manifest at `path`.
    A manifest with fewer rows is repeated with new ids and seeds, so every trial renders as
    many images. Returns how many distinct manifest rows the sample holds."""
    config = job.config
    # Nothing left to render: sample the manifest's valid rows, as a new output would render them.
    plan = job.manifest if job.pending_rows else plan_job(config, overwrite=True).manifest
    tables: list[pa.Table] = []
    have = 0
    for table in iter_pending(plan, config.storage, rules_for(job.preset)):
        tables.append(table.slice(0, rows - have))
        have += min(table.num_rows, rows - have)
        if have >= rows:
            break
    if not tables:
        raise ConfigError(f"the manifest {config.manifest} has no valid rows to sample")
    sample = pa.concat_tables(tables, promote_options="permissive")
    distinct: int = sample.num_rows
    copies = [sample]
    while sum(t.num_rows for t in copies) < rows:
        k = len(copies)
        copy = sample.set_column(
            sample.schema.get_field_index("id"), "id", pa.array([f"{i}~{k}" for i in sample.column("id").to_pylist()])
        )
        seeds = [(s + k) % 2**63 for s in sample.column("seed").to_pylist()]
        copies.append(copy.set_column(copy.schema.get_field_index("seed"), "seed", pa.array(seeds, pa.int64())))
    sample = pa.concat_tables(copies).slice(0, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sample, path)
    return distinct


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, ModelError) and "out of memory" in str(error).lower()


def run_trial(
    config: JobConfig,
    trial: Trial,
    *,
    manifest: Path,
    work_dir: Path,
    price: float | None,
    ray_address: str | None,
    progress: bool,
) -> TrialResult:
    """Render the sample with the trial's settings; a trial that runs out of memory (or fails)
    is recorded with its reason and the sweep goes on."""
    job = trial.apply(config).model_copy(
        update={"manifest": str(manifest), "output": str(work_dir / "trials" / trial.name), "on_bad_row": "skip"}
    )
    try:
        result = run_job(job, ray_address=ray_address, progress=progress, overwrite=True)
    except SdxlBatchError as error:
        reason = "out of memory" if _is_oom(error) else f"failed: {str(error).splitlines()[0][:160]}"
        logger.warning("trial %s: %s", trial.name, reason)
        return TrialResult(trial, reason)
    totals = result.job_stats.totals
    rate, startup, memory = measure(result)
    retries = totals.oom_retries
    status = "ok"
    if retries:
        # The batches were split to fit: this batch size does not run as asked.
        status = f"out of memory (split to {totals.min_render_batch_size})"
    return TrialResult(
        trial,
        status,
        images_per_second=rate,
        seconds_per_image=1 / rate if rate else 0.0,
        peak_memory_mb=memory,
        startup_seconds=startup,
        rows=totals.rows,
        oom_retries=retries,
        cost_per_1000=cost_per_1000(rate, price),
    )


@dataclass
class TuneResult:
    config: JobConfig
    results: list[TrialResult]
    work_dir: Path
    best_config: Path | None
    price: float | None
    sample_rows: int
    device: str
    best: TrialResult | None = field(init=False)

    def __post_init__(self) -> None:
        ok = [r for r in self.results if r.ok]
        self.best = max(ok, key=lambda r: r.images_per_second) if ok else None

    def table(self) -> str:
        unit = "GPU" if self.device == "gpu" else "machine"
        cost = f"cost/1k images ({unit}-hour at {self.price:g})" if self.price is not None else "cost/1k images"
        header = ("trial", "batch", f"actors/{unit}", "dtype", "compile", "images/s", "s/image", "peak MB", cost, "")
        rows = [header]
        for r in self.results:
            t = r.trial
            rows.append((
                t.name, str(t.batch_size), str(t.actors_per_gpu), t.dtype, "on" if t.compile else "off",
                f"{r.images_per_second:.3f}" if r.ok or r.images_per_second else "-",
                f"{r.seconds_per_image:.3f}" if r.seconds_per_image else "-",
                f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb else "-",
                f"{r.cost_per_1000:.4f}" if r.cost_per_1000 is not None else "-",
                ("best" if r is self.best else "") if r.ok else r.status,
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])

    def closing_lines(self) -> list[str]:
        failed = [r for r in self.results if not r.ok]
        lines = [f"\n{len(self.results)} trial(s) on {self.sample_rows} rows each; {len(failed)} did not count."]
        if self.best is None:
            lines.append("No trial completed without running out of memory: try smaller batch sizes.")
        else:
            lines.append(
                f"Best: {self.best.trial.name}: {self.best.images_per_second:.3f} images/s per "
                f"{'GPU' if self.device == 'gpu' else 'machine'} after warm-up"
            )
            if self.price is None:
                lines.append("Costs: pass --gpu-hour-price (or set resources.gpu_hour_price) to see them.")
        if self.best_config:
            lines.append(f"Best config: {self.best_config}")
        lines.append(f"Results:     {self.work_dir / TUNE_RESULT}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": self.device,
            "fingerprint": settings_fingerprint(self.config),
            "sample_rows": self.sample_rows,
            "gpu_hour_price": self.price,
            "trials": [r.to_dict() for r in self.results],
            "best": self.best.to_dict() if self.best else None,
        }


def default_work_dir(kind: str, config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "job"
    return Path("outputs") / kind / stem


def best_config_document(config: JobConfig, trial: Trial) -> dict[str, Any]:
    """The job's own settings (as given: file plus overrides) with the best trial's applied,
    scaled to the job's GPUs. Storage credentials are not copied."""
    data = config.model_dump(mode="json", exclude_unset=True, exclude={"storage": {"key", "secret"}})
    data.setdefault("generation", {})["batch_size"] = trial.batch_size
    data.setdefault("model", {}).update({"dtype": trial.dtype, "compile": trial.compile})
    resources = data.setdefault("resources", {})
    if on_gpu(config):
        gpus = job_gpus(config)
        resources["gpus_per_actor"] = round(1.0 / trial.actors_per_gpu, 6)
        resources["actors"] = max(1, math.floor(gpus * trial.actors_per_gpu + 1e-9))
    else:
        resources["actors"] = trial.actors_per_gpu
        resources["torch_threads"] = max(1, (os.cpu_count() or 1) // trial.actors_per_gpu)
    return data


def run_tune(
    config: JobConfig,
    space: SweepSpace,
    *,
    config_path: str | None = None,
    sample: int | None = None,
    price: float | None = None,
    work_dir: str | None = None,
    best_config: str | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Run every trial of the sweep on the same sample; write tune.json and the best config."""
    price = price if price is not None else config.resources.gpu_hour_price
    folder = Path(work_dir) if work_dir else default_work_dir("tune", config_path)
    job = plan_job(config, overwrite=True)
    rows = sample or 4 * max(space.batch_sizes) * max(space.actors_per_gpu)
    sample_path = folder / "sample.parquet"
    sample_manifest(job, rows, sample_path)
    trials = space.trials()
    results = []
    for number, trial in enumerate(trials, 1):
        if progress:
            print(f"trial {number}/{len(trials)}: {trial.name}", file=sys.stderr, flush=True)
        results.append(
            run_trial(
                config, trial, manifest=sample_path, work_dir=folder, price=price,
                ray_address=ray_address, progress=progress,
            )
        )  # fmt: skip
    result = TuneResult(config, results, folder, None, price, rows, "gpu" if on_gpu(config) else "cpu")
    if result.best is not None:
        path = Path(best_config) if best_config else folder / BEST_CONFIG
        header = (
            f"# Written by `sdxl-batch tune` on {datetime.now(UTC):%Y-%m-%d}: the fastest of {len(results)} trials "
            f"({result.best.trial.name}, {result.best.images_per_second:.3f} images/s per "
            f"{'GPU' if result.device == 'gpu' else 'machine'} on {rows} rows).\n"
            "# Storage credentials are not copied: set them in the environment (AWS_* variables or a profile).\n"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        document = best_config_document(config, result.best.trial)
        path.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        result.best_config = path
    (folder / TUNE_RESULT).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


@dataclass
class Estimate:
    rows: int  # rows to render
    images_per_second: float  # the whole job's steady rate
    startup_seconds: float
    gpus: float
    device: str
    price: float | None
    source: str

    @property
    def seconds(self) -> float:
        return self.startup_seconds + (self.rows / self.images_per_second if self.images_per_second else math.inf)

    @property
    def unit_hours(self) -> float:
        return self.seconds / 3600 * self.gpus

    @property
    def cost(self) -> float | None:
        return None if self.price is None else self.unit_hours * self.price

    def lines(self) -> list[str]:
        unit = "GPU" if self.device == "gpu" else "machine"
        lines = [
            f"rows to render   {self.rows:,}",
            f"throughput       {self.images_per_second:.3f} images/s for the job ({self.source})",
            f"start-up         {human_duration(self.startup_seconds)} (Ray, model loading)",
            f"time             {human_duration(self.seconds)} on {self.gpus:g} {unit}(s)",
            f"{unit}-hours".ljust(17) + f"{self.unit_hours:.3g}",
        ]
        if self.cost is None:
            lines.append("cost             pass --gpu-hour-price (or set resources.gpu_hour_price)")
        else:
            per_1000 = self.cost / self.rows * 1000 if self.rows else 0.0
            rate = f"at {self.price:g} per {unit}-hour"
            lines.append(f"cost             {_money(self.cost)} {rate} ({per_1000:.4f} / 1,000 images)")
        return lines


def _money(value: float) -> str:
    return f"{value:,.2f}" if value >= 1 else f"{value:.4f}"


def estimate_from_tuning(path: str, config: JobConfig, rows: int, price: float | None) -> Estimate:
    """Use the tuning result's trial with the job's settings (else its best), scaled to the job's GPUs."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the tuning result {path}: {error}") from None
    fingerprint = settings_fingerprint(config)
    if (data.get("fingerprint") or {}).get("digest") != fingerprint["digest"]:
        raise ConfigError(
            f"the tuning result {path} was measured with other model or image settings than this job "
            "(preset, weights, size, steps, guidance, format); run `sdxl-batch tune` with this config"
        )
    resources = config.resources
    per_gpu_actors = round(1 / (resources.gpus_per_actor or 1.0)) if on_gpu(config) else resources.max_actors
    dtypes = {config.model.dtype}
    if config.model.dtype == "auto":  # as the generator resolves it
        dtypes = {"bfloat16", "float16"} if on_gpu(config) else {"float32"}
    ok = [t for t in data.get("trials", []) if t.get("status") == "ok"]
    same = [
        t for t in ok
        if t["batch_size"] == config.generation.batch_size and t["actors_per_gpu"] == per_gpu_actors
        and t["dtype"] in dtypes and t["compile"] == config.model.compile
    ]  # fmt: skip
    chosen = same[0] if same else data.get("best")
    if not chosen:
        raise ConfigError(f"the tuning result {path} has no successful trial")
    how = "the trial with this job's settings" if same else f"its best trial {chosen['name']}: not this job's settings"
    gpus = job_gpus(config)
    return Estimate(
        rows=rows,
        images_per_second=float(chosen["images_per_second"]) * gpus,
        startup_seconds=float(chosen.get("startup_seconds", 0.0)),
        gpus=gpus,
        device="gpu" if on_gpu(config) else "cpu",
        price=price,
        source=f"tuning result {path}, {how}",
    )


def run_estimate(
    config: JobConfig,
    *,
    tuning: str | None = None,
    sample: int | None = None,
    price: float | None = None,
    work_dir: str | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> Estimate:
    """Time and cost of the job's pending rows, from a tuning result or a calibration run (the
    job's own settings on a sample of its pending rows, in a scratch output)."""
    price = price if price is not None else config.resources.gpu_hour_price
    job = plan_job(config)
    config = prepare(config, ray_address)
    if tuning:
        return estimate_from_tuning(tuning, config, job.pending_rows, price)
    folder = Path(work_dir) if work_dir else default_work_dir("estimate", None) / job.fingerprint["digest"]
    rows = sample or 4 * config.generation.batch_size * config.resources.max_actors
    sample_path = folder / "sample.parquet"
    sample_manifest(job, rows, sample_path)
    calibration = config.model_copy(
        update={"manifest": str(sample_path), "output": str(folder / "calibration"), "on_bad_row": "skip"}
    )
    result = run_job(calibration, ray_address=ray_address, progress=progress, overwrite=True)
    rate, startup, _ = measure(result)
    return Estimate(
        rows=job.pending_rows,
        images_per_second=rate,
        startup_seconds=startup,
        gpus=job_gpus(config),
        device="gpu" if on_gpu(config) else "cpu",
        price=price,
        source=f"calibration run of {result.rows} rows with the job's settings",
    )

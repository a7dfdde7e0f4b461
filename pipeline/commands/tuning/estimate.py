"""`sdxl-batch estimate`: the time and cost of a job's pending rows on a fleet.

The rates come from a tuning result (`--from tune.json`: each GPU type's steady images/s and
start-up at its chosen settings) or, without one, from a calibration run of the job's own settings
on a sample of its pending rows in a scratch output. `--fleet A10G=16,H100=8` says which GPUs
(default: those the tuning ran on); `--deadline 6h` picks the cheapest mix of them that meets it,
`--budget 500` the fastest within it (`cost`). A job with nothing to render says so without
starting Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.commands.tuning.cost import (
    FleetPlan,
    TypeOffer,
    cheapest_within,
    fastest_within,
    fleet_estimate,
    parse_counts,
    parse_duration,
    price_for,
)
from pipeline.commands.tuning.sample import sample_manifest
from pipeline.commands.tuning.space import CPU
from pipeline.core.errors import ConfigError
from pipeline.plan.job import JobPlan, plan_job
from pipeline.plan.ledger import settings_fingerprint
from pipeline.run.inprocess import in_process_config
from pipeline.run.runner import planning_executor, resolve_job, run_job
from pipeline.run.session import init_ray

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig

# What tune chooses: a tuning result measured with other values of these still applies.
TUNED_KEYS = ("model.dtype", "vae", "model.attention", "model.compile", "model.fuse_qkv")


@dataclass
class EstimateRequest:
    tuning: str | None = None
    fleet: str | None = None
    prices: dict[str, float] | None = None
    default_price: float | None = None
    deadline: str | None = None
    budget: float | None = None
    sample: int | None = None
    work_dir: str | None = None
    progress: bool = True


@dataclass
class EstimateResult:
    plan: FleetPlan | None
    source: str
    goal: str = ""  # what --deadline/--budget asked, for the message when nothing meets it
    nothing_pending: bool = False

    def lines(self) -> list[str]:
        if self.nothing_pending:
            return ["rows to render   0: every row of the manifest is in the output already (nothing to estimate)"]
        if self.plan is None:
            return [f"no mix of the available GPUs meets {self.goal}", f"rates from       {self.source}"]
        return [*self.plan.lines(), f"rates from       {self.source}"]


def run_estimate(config: JobConfig, request: EstimateRequest, *, ray_address: str | None) -> EstimateResult:
    """The job's pending rows priced as the module says."""
    if request.deadline and request.budget is not None:
        raise ConfigError(
            "--deadline and --budget: give one (the cheapest mix for a deadline, or the fastest for a budget)"
        )
    job = plan_job(config, executor=planning_executor(config, ray_address))
    if not job.pending_rows:
        return EstimateResult(None, "", nothing_pending=True)
    if request.tuning:
        offers = offers_from_tuning(request.tuning, config, request)
        source = f"tuning result {request.tuning}"
    else:
        offers = _calibrate(config, job, request, ray_address)
        source = "a calibration run of the job's own settings on a sample of its rows"
    rows = job.pending_rows
    if request.deadline:
        seconds = parse_duration(request.deadline)
        return EstimateResult(cheapest_within(offers, rows, seconds), source, goal=f"--deadline {request.deadline}")
    if request.budget is not None:
        return EstimateResult(fastest_within(offers, rows, request.budget), source, goal=f"--budget {request.budget:g}")
    counts = {name: offer.available for name, offer in offers.items()}
    return EstimateResult(fleet_estimate(offers, counts, rows), source)


def offers_from_tuning(path: str, config: JobConfig, request: EstimateRequest) -> dict[str, TypeOffer]:
    """Each GPU type's rate and start-up at its chosen settings (the fleet's where tune chose one),
    the GPUs available (`--fleet`, else those the tuning ran on) and its price."""
    record = _read_tuning(path)
    _check_same_job(record, config, path)
    chosen: dict[str, Any] = (record.get("fleet") or {}).get("types") or {
        name: best for name, best in (record.get("best") or {}).items() if best
    }
    if not chosen:
        raise ConfigError(f"the tuning result {path} has no chosen setting (nothing ran within its constraints)")
    available = (
        parse_counts(request.fleet) if request.fleet else {n: int(t["gpus"]) for n, t in record["types"].items()}
    )
    unknown = [name for name in available if name not in chosen]
    if unknown:
        raise ConfigError(
            f"--fleet: the tuning result {path} measured {', '.join(chosen)}, not {', '.join(unknown)}: "
            f"run `sdxl-batch tune` on a cluster with them"
        )
    offers = {}
    for name, count in available.items():
        best = chosen[name]
        price = price_for(request.prices or {}, name, request.default_price)
        offers[name] = TypeOffer(
            name=name,
            images_per_second=float(best["images_per_second"]),
            startup_seconds=float(best.get("startup_seconds") or 0.0),
            price=price if price is not None else record["types"].get(name, {}).get("price"),
            available=count,
        )
    return offers


def _read_tuning(path: str) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the tuning result {path}: {error}") from None
    if not isinstance(record, dict) or "types" not in record or "trials" not in record:
        raise ConfigError(f"{path} is not a tuning result of this version of sdxl-batch tune: run tune again")
    return record


def _check_same_job(record: dict[str, Any], config: JobConfig, path: str) -> None:
    """A tuning result applies to a job with the same model and images (tune chooses the rest)."""
    measured = (record.get("fingerprint") or {}).get("settings") or {}
    current = settings_fingerprint(config)["settings"]
    changed = [k for k in current if k not in TUNED_KEYS and k in measured and measured[k] != current[k]]
    if changed:
        what = "; ".join(f"{k}: {measured[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"the tuning result {path} was measured with other model or image settings than this job ({what}); "
            "run `sdxl-batch tune` with this config"
        )


def _calibrate(
    config: JobConfig, job: JobPlan, request: EstimateRequest, ray_address: str | None
) -> dict[str, TypeOffer]:
    """The job's own settings on a sample of its pending rows, in a scratch output."""
    from pipeline.commands.tuning.tune import default_work

    init_ray(ray_address)
    resolved, _ = resolve_job(config, embedded=ray_address is None)
    resources = resolved.resources
    gpus = int(resources.max_actors * (resources.gpus_per_actor or 0)) if resources.on_gpu else 1
    folder = Path(request.work_dir) if request.work_dir else default_work("estimate", None) / job.fingerprint["digest"]
    rows = request.sample or 4 * max(config.batch_sizes) * resources.max_actors
    sample = sample_manifest(job, rows)
    folder.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(sample, folder / "sample.parquet")
    # The sample runs where the whole job would (in this process or on Ray: `run.inprocess`), so
    # that its start-up is the job's.
    here = in_process_config(config, job.pending_rows, ray_address=ray_address, metrics_port=None, tuning=False)
    calibration = config.model_copy(
        update={
            "manifest": str(folder / "sample.parquet"), "output": str(folder / "calibration"), "on_bad_row": "skip",
            "resources": config.resources.model_copy(update={"in_process": here is not None}),
        }
    )  # fmt: skip
    result = run_job(calibration, ray_address=ray_address, progress=request.progress, overwrite=True)
    stats = result.job_stats
    rate = stats.steady_images_per_second() or stats.generation_images_per_second()
    startup = max(0.0, result.wall_seconds - stats.generation_span_seconds())
    name = "GPU" if resources.on_gpu else CPU
    return {
        name: TypeOffer(
            name=name,
            images_per_second=rate / max(gpus, 1),
            startup_seconds=startup,
            price=price_for(request.prices or {}, name, request.default_price),
            available=max(gpus, 1),
        )
    }

"""What `tune` writes: `tune.json` (every load and measurement), a table per GPU type on the
console, `tune.html` (plots, `page`), and the chosen settings as a job config (`best.yaml`) with a
`fleet:` section that `sdxl-batch run` takes as it is, from anywhere: absolute or `s3://` manifest
and output, no thread counts of the machine that tuned, no credentials."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.commands.tuning.cost import cost_per_1000, price_for
from pipeline.commands.tuning.page import write_tune_page
from pipeline.commands.tuning.points import Point
from pipeline.commands.tuning.space import CPU

if TYPE_CHECKING:
    from pipeline.commands.tuning.results import Choice
    from pipeline.commands.tuning.tune import TuneRun

TUNE_RESULT = "tune.json"
TUNE_PAGE = "tune.html"
BEST_CONFIG = "best.yaml"


def price_of(run: TuneRun, accelerator_type: str) -> float | None:
    price: float | None = price_for(run.options.prices, accelerator_type, run.options.default_price)
    return price


def add_costs(run: TuneRun) -> None:
    """$ per 1,000 images of every point, its start-up amortised over the job's pending rows on
    every GPU of its type."""
    rows = run.pending_rows or None
    for point in run.summary.points:
        if not point.ok:
            continue
        point.cost_per_1000 = cost_per_1000(
            point.images_per_second,
            price_of(run, point.accelerator_type),
            startup_seconds=run.summary.startup_seconds(point),
            gpus=run.types[point.accelerator_type].gpus,
            rows=rows,
        )


def occupancy(run: TuneRun) -> dict[str, float | None]:
    """The sum of the trials' times over GPUs x wall time: over the trials' span, and over the
    whole command (sampling, Ray Tune's start and the writing included). Cached loads cost none."""
    ran = [load for load in run.summary.loads if not load.cached and load.ended_at > load.started_at]
    gpus = sum(kind.gpus for kind in run.types.values())
    if not ran or not gpus:
        return {"trials": None, "command": None}
    busy = sum(load.seconds for load in ran)
    span = max(load.ended_at for load in ran) - min(load.started_at for load in ran)
    command = run.ended_at - run.started_at
    return {
        "trials": round(busy / (gpus * span), 4) if span > 0 else None,
        "command": round(busy / (gpus * command), 4),
    }


def loads_per_gpu(run: TuneRun) -> dict[str, int]:
    """Models loaded per GPU (node and GPU ids): one per actor of each load run there."""
    counts: Counter[str] = Counter()
    for load in run.summary.loads:
        if not load.cached and load.loads:
            counts[f"{load.accelerator_type}:{load.node_id[:12]}/{load.gpu or 'cpu'}"] += load.loads
    return dict(sorted(counts.items()))


def _choice(run: TuneRun, name: str, choice: Choice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    startup = run.summary.startup_seconds(choice.point)
    return choice.to_dict(gpus=run.types[name].gpus, price=price_of(run, name), startup=startup)


def tune_record(run: TuneRun) -> dict[str, Any]:
    """The `tune.json` record (docs/throughput.md describes its fields)."""
    summary = run.summary
    fleet = None
    if summary.fleet is not None:
        fleet = {
            "pixels": {k: v for k, v in summary.fleet.items() if k != "images_per_second"},
            "images_per_second": summary.fleet["images_per_second"],
            "types": {name: _choice(run, name, choice) for name, choice in summary.fleet_choices.items()},
        }
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "search": run.options.search,
        "wall_seconds": round(run.ended_at - run.started_at, 3),
        "occupancy": occupancy(run),
        "loads_per_gpu": loads_per_gpu(run),
        "types": {name: {**kind.to_dict(), "price": price_of(run, name)} for name, kind in run.types.items()},
        "pending_rows": run.pending_rows,
        "sample": {"rows": run.sample_rows, "groups": run.sample_groups},
        "quality": {
            "metric": run.options.gate.metric,
            "threshold": run.options.gate.threshold,
            "reference": {name: run.space.reference_for(name).key for name in run.types},
        },
        "constraints": {
            "max_memory_fraction": run.options.max_memory_fraction,
            "min_images_per_second": run.options.min_images_per_second,
        },
        "space": run.space.to_dict(),
        "versions": run.versions,
        "fingerprint": run.fingerprint,
        "cache": {"hits": run.cache_hits},
        "loads": [load.to_dict(with_points=False) for load in summary.loads],
        "trials": [point.to_dict() for point in summary.points],
        "best": {name: _choice(run, name, choice) for name, choice in summary.per_type.items()},
        "fleet": fleet,
    }


def _rate(point: Point) -> str:
    if not point.ok:
        return "-"
    return f"{point.images_per_second:.3f} ± {point.spread:.3f}"


def _memory(point: Point) -> str:
    if point.peak_memory_mb is None:
        return "-"
    share = f" {point.memory_fraction:.0%}" if point.memory_fraction is not None else ""
    return f"{point.peak_memory_mb:,.0f}{share}"


def _quality(point: Point, reference: bool) -> str:
    if reference:
        return "ref"
    if point.quality_passed is None:
        return "-"
    value = "inf" if point.quality is None else f"{point.quality:.1f}"
    return value + ("" if point.quality_passed else " FAIL")


def _status(point: Point, chosen: Choice | None) -> str:
    if chosen is not None and point is chosen.point:
        return f"best ({chosen.reason})"
    return point.note or ("" if point.ok else point.status) + (" (cached)" if point.cached else "")


def type_table(run: TuneRun, name: str) -> str:
    """Every measurement of one type, its best marked."""
    references = {load.load_id for load in run.summary.loads if load.reference}
    header = ("load", "batch", "images/s ± spread", "peak MB", "busy", "waits on", "quality", "$/1k", "")
    rows = [header]
    chosen = run.summary.per_type.get(name)
    for point in sorted((p for p in run.summary.points if p.accelerator_type == name), key=lambda p: (p.load, p.batch)):
        rows.append((
            point.load.key, point.batch.key, _rate(point), _memory(point),
            f"{point.busy_fraction:.2f}" if point.busy_fraction is not None else "-", point.bottleneck or "-",
            _quality(point, point.load_id in references), f"{point.cost_per_1000:.4f}" if point.cost_per_1000 else "-",
            _status(point, chosen),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    kind = run.types[name]
    price = price_of(run, name)
    title = f"{name}: {kind.gpus} GPU(s) on {kind.nodes} node(s), {kind.cpus_per_gpu:g} CPUs per GPU"
    if name == CPU:
        title = f"this machine (no GPUs): {kind.cpus_per_gpu:g} CPUs"
    title += f", {price:g} per {'machine' if name == CPU else 'GPU'}-hour" if price is not None else ""
    return "\n".join([title, lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def best_config_document(run: TuneRun) -> dict[str, Any] | None:
    """The job's own settings (file plus overrides) with the chosen ones applied; None when
    nothing eligible was measured. With GPUs: one pixel setting and a `fleet:` section."""
    summary, config = run.summary, run.config
    data = config.model_dump(mode="json", exclude_unset=True, exclude={"storage": {"key", "secret"}})
    data["manifest"], data["output"] = _absolute(config.manifest), _absolute(config.output)
    model = data.setdefault("model", {})
    if config.model.cache_dir:
        model["cache_dir"] = _absolute(config.model.cache_dir)
    resources = data.setdefault("resources", {})
    resources.pop("torch_threads", None)  # the tuning machine's, not the job's
    if summary.on_cpu:
        choice = summary.per_type.get(CPU)
        if choice is None:
            return None
        point = choice.point
        model.update(point.load.model_update())
        if point.batch.vae_batch_size:
            model["vae_batch_size"] = point.batch.vae_batch_size
        data.setdefault("generation", {})["batch_size"] = point.batch.batch_size
        resources["actors"] = point.load.actors_per_gpu
        return data
    if not summary.fleet_choices:
        return None
    model.update({k: v for k, v in (summary.fleet or {}).items() if k != "images_per_second"})
    for key in ("actors", "gpus_per_actor"):
        resources.pop(key, None)
    data["fleet"] = {name: _fleet_entry(choice.point) for name, choice in summary.fleet_choices.items()}
    return data


def _fleet_entry(point: Point) -> dict[str, Any]:
    entry: dict[str, Any] = {"batch_size": point.batch.batch_size, "actors_per_gpu": point.load.actors_per_gpu}
    entry["channels_last"] = point.load.channels_last
    if point.batch.vae_batch_size:
        entry["vae_batch_size"] = point.batch.vae_batch_size
    if point.batch.encode_cpus_per_gpu:
        entry["encode_cpus_per_gpu"] = point.batch.encode_cpus_per_gpu
    return entry


def write_outputs(run: TuneRun) -> tuple[dict[str, Any], Path | None]:
    """tune.json, tune.html and the best config; returns the record and the config's path."""
    import json

    add_costs(run)
    folder = run.options.work_dir
    folder.mkdir(parents=True, exist_ok=True)
    record = tune_record(run)
    (folder / TUNE_RESULT).write_text(json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
    write_tune_page(record, folder / TUNE_PAGE)
    document = best_config_document(run)
    if document is None:
        return record, None
    path = run.options.best_config or folder / BEST_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_best_header(run) + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return record, path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    return str(value)


def _best_header(run: TuneRun) -> str:
    summary = run.summary
    if summary.on_cpu and (choice := summary.per_type.get(CPU)) is not None:
        what = f"{choice.point.load.key} {choice.point.batch.key}, {choice.point.images_per_second:.3f} images/s"
    else:
        total = (summary.fleet or {}).get("images_per_second", 0.0)
        types = ", ".join(f"{run.types[n].gpus} x {n}" for n in summary.fleet_choices)
        what = f"a fleet of {types}: {total:.3f} images/s together"
    return (
        f"# Written by `sdxl-batch tune` on {datetime.now(UTC):%Y-%m-%d}: {what} "
        f"(steady, after warm-up, on {run.sample_rows} sampled rows).\n"
        "# Storage credentials are not copied: set them in the environment (AWS_* variables or a profile).\n"
    )


def closing_lines(run: TuneRun, record: dict[str, Any], best_config: Path | None) -> list[str]:
    summary = run.summary
    loads = [load for load in summary.loads if not load.cached]
    lines = [
        "",
        f"{len(summary.points)} measurement(s) on {len(summary.loads)} load(s) ({len(loads)} run, "
        f"{len(summary.loads) - len(loads)} from the cache), {run.sample_rows} rows each, "
        f"in {human_seconds(run.ended_at - run.started_at)}",
    ]
    share = record["occupancy"]
    if share["command"] is not None:
        lines.append(
            f"GPU occupancy: {share['command']:.0%} of GPUs x wall time ({share['trials']:.0%} over the trials)"
        )
    models = sum(load.loads for load in loads)
    lines.append(f"Models loaded: {models} ({len(record['loads_per_gpu'])} GPU(s): {record['loads_per_gpu']})")
    for name in run.types:
        choice = summary.per_type.get(name)
        lines.append(
            f"Best on {name}: {choice.point.load.key} {choice.point.batch.key}, "
            f"{choice.point.images_per_second:.3f} images/s per GPU ({choice.reason})"
            if choice
            else f"Best on {name}: none (nothing ran within the constraints and through the quality gate)"
        )
    if summary.fleet is not None and not summary.on_cpu:
        pixels = ", ".join(f"{k}={v}" for k, v in summary.fleet.items() if k != "images_per_second")
        lines.append(f"Fleet: {pixels}: {summary.fleet['images_per_second']:.3f} images/s on every GPU together")
    elif not summary.on_cpu:
        lines.append("Fleet: no setting of what changes pixels passed on every type: see the table")
    if best_config:
        lines.append(f"Best config: {best_config}")
    lines.append(f"Results:     {run.options.work_dir / TUNE_RESULT} and {run.options.work_dir / TUNE_PAGE}")
    return lines


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

"""The report page: the summary table's fields and formats, the contact sheet, and the template
(`templates/report.html.j2`, shipped as package data) that puts them and the plots together."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.core.layout import STATS_DIR, STATS_FILE
from pipeline.output.report.figures import actor_summaries, stage_breakdown, summarise_parts, throughput_series
from pipeline.output.report.plots import MAX_ACTORS_PLOTTED, plot_actors, plot_stages, plot_throughput
from pipeline.output.stats import wall_breakdown_text

if TYPE_CHECKING:
    from jinja2 import Environment

    from pipeline.output.report.read import OutputContents

THUMBNAIL_PX = 256
TEMPLATE = "report.html.j2"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"
    if value >= 120:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{value:.3g} s" if value < 10 else f"{value:.1f} s"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _megabytes(value: float) -> str:
    return f"{value / 1024:.1f} GiB" if value >= 10240 else f"{value:,.0f} MiB"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _timestamp(value: str) -> str:
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


# The summary table: (group, label, key in stats.json, how to show it). Absent keys are left out,
# so outputs of older versions (or without GPUs) show what they have.
SUMMARY_FIELDS: tuple[tuple[str, str, str, Callable[[Any], str]], ...] = (
    ("Rows", "Rows rendered", "rows", _count),
    ("Rows", "Manifest rows", "manifest_rows", _count),
    ("Rows", "Skipped, already done", "rows_done_before", _count),
    ("Rows", "Rejected (bad rows)", "rows_rejected", _count),
    ("Rows", "Output, all runs", "output_rows", str),
    ("Rows", "Image bytes", "bytes", _size),
    ("Speed", "Wall time", "wall_seconds", _seconds),
    (
        "Speed",
        "Wall time by phase",
        "wall_breakdown_seconds",
        lambda v: wall_breakdown_text({"wall_breakdown_seconds": v}),
    ),
    ("Speed", "Images/s, wall time", "images_per_second", "{:.3g}".format),
    ("Speed", "Images/s, rendering (first image to last commit)", "rendering_images_per_second", "{:.3g}".format),
    ("Speed", "Images/s, generating (first model call to last)", "generation_images_per_second", "{:.3g}".format),
    ("Speed", "Images/s, steady (after warm-up)", "steady_images_per_second", "{:.3g}".format),
    ("Speed", "Seconds per image", "seconds_per_image", "{:.3g} s".format),
    ("Speed", "Batch latency p50", "batch_latency_seconds", lambda v: f"{v['p50']:.3g} s"),
    ("Speed", "Batch latency p90", "batch_latency_seconds", lambda v: f"{v['p90']:.3g} s"),
    ("Speed", "Batch latency p99", "batch_latency_seconds", lambda v: f"{v['p99']:.3g} s"),
    ("Speed", "Model calls", "model_calls", _count),
    ("Resources", "Busy fraction", "busy_fraction", lambda v: f"{100 * v:.1f} %"),
    ("Resources", "Peak memory", "peak_memory_mb", _megabytes),
    ("Resources", "GPU utilisation", "gpu_utilization_percent", "{:.1f} %".format),
    ("Resources", "Peak GPU memory", "peak_gpu_memory_mb", _megabytes),
    ("Resources", "OOM retries", "oom_retries", _count),
    ("Resources", "Prompts truncated", "prompts_truncated", _count),
    ("Job", "Model", "model", str),
    ("Job", "Scheduler", "scheduler", str),
    ("Job", "Batch size", "batch_size", _count),
    ("Job", "Actors", "actors", _count),
    ("Job", "Layout", "layout", str),
    ("Job", "Image format", "image_format", str),
    ("Job", "Started (UTC)", "started_at", _timestamp),
    ("Job", "Finished (UTC)", "finished_at", _timestamp),
)


def summary_groups(summary: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The summary table as titled groups of (label, shown value)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for group, label, key, show in SUMMARY_FIELDS:
        value = summary.get(key)
        if value is None or value == "" or value == {}:
            continue
        try:
            shown = show(value)
        except (TypeError, ValueError, KeyError):  # a hand-edited or foreign stats.json: show it raw
            shown = str(value)
        groups.setdefault(group, []).append((label, shown))
    return list(groups.items())


HEADLINE = (("rows", "images rendered"), ("images_per_second", "images/s, wall time"),
            ("generation_images_per_second", "images/s, generating"), ("wall_seconds", "wall time"))  # fmt: skip


def summary_figures(contents: OutputContents) -> tuple[dict[str, Any], list[str]]:
    """The summary figures (stats.json, else rebuilt from the parts) and notes on where they come from."""
    notes = []
    summary = contents.stats
    if summary is None:
        notes.append(
            f"No {STATS_FILE} (the last run did not finish, or predates it): the summary is rebuilt from the "
            f"{contents.records.parts:,} per-part stats records; its wall time runs from the first model call to the "
            "last commit."
        )
        summary = summarise_parts(contents.records, contents.job)
    if not contents.records.parts:
        notes.append(f"No per-part stats records in {STATS_DIR}/: no throughput, per-actor or stage figures.")
    elif summary.get("rows") != contents.metadata_rows:
        notes.append(
            f"The summary covers the last run ({summary.get('rows') or 0:,} rows); the figures below cover every "
            f"committed part of every run ({contents.metadata_rows:,} rows in {contents.metadata_parts:,} parts)."
        )
    sampled = contents.samples[0] if contents.samples else {}
    return {
        # Older stats.json files lack the model; every metadata row records it.
        "model": sampled.get("model"),
        "scheduler": sampled.get("scheduler"),
        "started_at": (contents.job or {}).get("started_at"),
        **{key: value for key, value in summary.items() if value is not None},
        "output_rows": f"{contents.metadata_rows:,} in {contents.metadata_parts:,} parts",
    }, notes


def _sample_cards(contents: OutputContents) -> list[dict[str, Any]]:
    cards = []
    for row, data in zip(contents.samples, contents.images, strict=True):
        thumb = thumbnail(data)
        cards.append({
            "id": str(row["id"]),
            "prompt": str(row.get("prompt") or ""),
            "seed": row.get("seed"),
            "size": f"{row['width']}×{row['height']}" if row.get("width") and row.get("height") else "",
            "src": thumb[0] if thumb else None,
            "width": thumb[1] if thumb else 0,
            "height": thumb[2] if thumb else 0,
        })  # fmt: skip
    return cards


def thumbnail(data: bytes | None, *, size: int = THUMBNAIL_PX) -> tuple[str, int, int] | None:
    """A JPEG data: URI of the image scaled to fit `size` pixels, with its width and height;
    None when the bytes are not an image Pillow can read."""
    if data is None:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((size, size))
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=85, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), rgb.width, rgb.height


@functools.cache
def environment() -> Environment:
    """The template's environment: the template is package data, found wherever the package is
    installed (a wheel, a zip, a source tree). Autoescape is on for every template."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    loader = PackageLoader("pipeline.output.report", "templates")
    return Environment(loader=loader, autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_report(contents: OutputContents) -> str:
    """The report page as one HTML string, everything embedded. Every value from the output
    (prompts, ids, paths) is escaped by the template; only our own SVG is inserted as markup."""
    from markupsafe import Markup

    figures, notes = summary_figures(contents)
    if contents.writer:
        notes.insert(0, contents.writer[0].upper() + contents.writer[1:] + ".")
    groups = summary_groups(figures)
    shown = dict(item for _, items in groups for item in items)
    labels = {key: label for _, label, key, _ in SUMMARY_FIELDS}
    series = throughput_series(contents.records)
    total = contents.records.total
    actors = actor_summaries(total)
    stages = stage_breakdown(total) if contents.records.parts else []
    stage_total = sum(seconds for _, seconds in stages) or 1.0
    rows = max(total.rows, 1)
    whole = (contents.stats or {}).get("output") or {}
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            output=contents.output,
            generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            notes=notes,
            tiles=[(shown[labels[key]], caption) for key, caption in HEADLINE if labels[key] in shown],
            groups=groups,
            throughput=Markup(plot_throughput(series)) if series is not None else None,
            calls=contents.records.stats.model_calls,
            actors=actors,
            actors_plot=Markup(plot_actors(actors)) if actors else None,
            actors_hidden=max(0, len(actors) - MAX_ACTORS_PLOTTED),
            stages=[(name, seconds, 100 * seconds / stage_total, 1000 * seconds / rows) for name, seconds in stages],
            stages_plot=Markup(plot_stages(stages)) if stages else None,
            samples=_sample_cards(contents),
            runs=whole.get("by_run") or [],
            whole=whole,
            sample_total=contents.metadata_rows,
        )
    )

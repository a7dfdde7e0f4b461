"""`sdxl-batch report`: one self-contained HTML page about an output.

It reads what a job leaves under its output prefix: `stats.json` (the last run), the per-part
stats records in `stats/` (every run), a sample of the metadata and its images, and `job.json`;
and writes `report.html` next to them. The page embeds everything it shows (plots as inline SVG,
thumbnails as data: URIs, its CSS) and loads nothing, so it can be mailed, archived with the
output, or opened on a machine without network access.

Scale: a million-row job has thousands of parts. Only the metadata's `id` column is read in full
(to spread the samples evenly), then only the files holding sampled rows, and only the sampled
images; the small stats records are fetched together (`fs.cat` on a list, concurrent on S3).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.core.errors import SdxlBatchError, StorageError
from pipeline.core.io import filesystem, full_uri, join, write_bytes
from pipeline.core.layout import (
    JOB_RECORD,
    METADATA_DIR,
    REPORT_FILE,
    STATS_DIR,
    STATS_FILE,
    committed_parts,
    part_stats_paths,
    read_json,
)
from pipeline.output.stats import PERCENTILES

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from matplotlib.figure import Figure

    from pipeline.core.config import StorageConfig

logger = logging.getLogger(__name__)

THUMBNAIL_PX = 256
MAX_ACTORS_PLOTTED = 48
# Columns the contact sheet shows; older outputs may lack some, so only those present are read.
SAMPLE_COLUMNS = ("id", "prompt", "seed", "width", "height", "steps", "model", "scheduler", "image_path", "tar_member")
# Generator phases, in pipeline order, with the names the report shows.
PHASES = {"text_encode": "Text encode", "denoise": "Denoise (UNet)", "vae_decode": "VAE decode", "to_host": "To host"}

BLUE, ORANGE, GREY, INK = "#2563eb", "#f59e0b", "#94a3b8", "#1e293b"


@dataclass
class OutputContents:
    """What the report is made of, as read from one output prefix."""

    output: str
    stats: dict[str, Any] | None  # stats.json: the last run
    parts: list[dict[str, Any]]  # stats/part-*.json: every committed part of every run
    job: dict[str, Any] | None
    metadata_rows: int
    metadata_parts: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # metadata rows, sorted by id
    images: list[bytes | None] = field(default_factory=list)  # the samples' images (None: unreadable)


@dataclass(frozen=True)
class ActorSummary:
    """One generator actor over every part: what the per-actor chart and table show."""

    actor: str
    node: str
    gpu: str
    rows: int
    calls: int
    busy_seconds: float
    span_seconds: float
    gpu_utilization_percent: float | None
    gpu_memory_peak_mb: float | None

    @property
    def label(self) -> str:
        return f"{_short(self.actor, 8)} @ {_short(self.node, 8)}" + (f" gpu {_short(self.gpu, 4)}" if self.gpu else "")

    @property
    def images_per_second(self) -> float:
        return self.rows / self.span_seconds if self.span_seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float | None:
        return min(1.0, self.busy_seconds / self.span_seconds) if self.span_seconds > 0 else None


@dataclass(frozen=True)
class ThroughputSeries:
    """Images finished over time (seconds since the first model call started)."""

    finished_at: np.ndarray  # end of each call, sorted
    cumulative: np.ndarray  # images finished by then
    bin_edges: np.ndarray
    images_per_second: np.ndarray  # one value per bin

    @property
    def span(self) -> float:
        return float(self.bin_edges[-1] - self.bin_edges[0]) if len(self.bin_edges) else 0.0


def write_report(output: str, storage: StorageConfig | None = None, *, samples: int = 24) -> str:
    """Write `<output>/report.html` and return its URI (a local path, or `s3://...`).

    Args:
        output: the job's output prefix, local or object store.
        storage: the object-store options (endpoint, credentials); None for the defaults.
        samples: images on the contact sheet, spread evenly over the ids.

    Raises:
        SdxlBatchError: the output does not exist or holds no committed part.
        StorageError: the output cannot be read or the report cannot be written.
    """
    fs, root = filesystem(output, storage)
    contents = read_output(fs, root, output, samples=samples)
    html = render_report(contents)
    path = join(root, REPORT_FILE)
    try:
        write_bytes(fs, path, html.encode("utf-8"))
    except OSError as error:
        raise StorageError(f"cannot write the report to {full_uri(fs, path)}: {error}") from None
    return full_uri(fs, path)


# Reading ---------------------------------------------------------------------------------------


def read_output(fs: AbstractFileSystem, root: str, output: str, *, samples: int) -> OutputContents:
    """Read the stats, the job record, and `samples` metadata rows with their images."""
    try:
        return _read_output(fs, root, output, samples=samples)
    except (OSError, pa.ArrowException) as error:  # no access, or a damaged metadata part
        raise StorageError(
            f"cannot read the output {output}: {type(error).__name__}: {error} (`sdxl-batch verify {output}` "
            "checks every part)"
        ) from None


def _read_output(fs: AbstractFileSystem, root: str, output: str, *, samples: int) -> OutputContents:
    if not fs.exists(root):
        raise SdxlBatchError(
            f"nothing to report: the output {output} does not exist (point `sdxl-batch report` at a job's output)"
        )
    files = committed_parts(fs, root)
    if not files:
        raise SdxlBatchError(
            f"nothing to report under {output}: no committed part (looked for {join(output, METADATA_DIR)}/"
            "part-*.parquet); run the job first, or check the output prefix"
        )
    contents = OutputContents(
        output=output,
        stats=read_json(fs, join(root, STATS_FILE)),
        parts=_read_part_records(fs, root),
        job=read_json(fs, join(root, JOB_RECORD)),
        metadata_rows=0,
        metadata_parts=len(files),
    )
    contents.metadata_rows, contents.samples = _pick_samples(fs, files, samples)
    contents.images = _read_images(fs, root, contents.samples)
    return contents


def _read_part_records(fs: AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    paths = part_stats_paths(fs, root)
    if not paths:
        return []
    records = []
    for path, data in sorted(fs.cat(paths, on_error="return").items()):
        try:
            if isinstance(data, BaseException):
                raise data
            record = json.loads(data)
        except (OSError, ValueError) as error:  # a damaged record costs its part's figures, not the report
            logger.warning("ignoring the stats record %s: %s", path, error)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _pick_samples(fs: AbstractFileSystem, files: list[str], samples: int) -> tuple[int, list[dict[str, Any]]]:
    """The total row count and `samples` rows spread evenly over the sorted ids.

    Reads the `id` column of every part, then only the parts that hold a sampled row."""
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    ids = dataset.to_table(columns=["id", "__filename"])
    total = ids.num_rows
    if samples <= 0 or total == 0:
        return total, []
    order = pc.sort_indices(ids, sort_keys=[("id", "ascending")]).to_numpy()
    picked = ids.take(order[np.unique(np.linspace(0, total - 1, min(samples, total)).round().astype(np.int64))])
    wanted = picked.column("id").to_pylist()
    holders = sorted(set(picked.column("__filename").to_pylist()))
    columns = [c for c in SAMPLE_COLUMNS if c in dataset.schema.names]
    table = pads.dataset(holders, format="parquet", filesystem=fs).to_table(
        columns=columns, filter=pc.field("id").isin(wanted)
    )
    by_id = {row["id"]: row for row in table.to_pylist()}  # a duplicated id (a broken output) shows once
    return total, [by_id[i] for i in sorted(by_id)]


def _read_images(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]]) -> list[bytes | None]:
    """The sampled rows' image bytes (None where unreadable): files are fetched together, tar
    members read from their shards in parallel."""
    images: list[bytes | None] = [None] * len(rows)
    files = {i: join(root, row["image_path"]) for i, row in enumerate(rows) if not row.get("tar_member")}
    if files:
        try:
            fetched = fs.cat(list(files.values()), on_error="return")
        except FileNotFoundError:  # fsspec raises when none of the paths exists
            fetched = {}
        for i, path in files.items():
            data = fetched.get(path)
            images[i] = data if isinstance(data, bytes) else None
    shards: dict[str, dict[str, int]] = defaultdict(dict)  # shard -> member -> sample index
    for i, row in enumerate(rows):
        if row.get("tar_member"):
            shards[row["image_path"]][row["tar_member"]] = i

    def read_shard(shard: str) -> dict[str, bytes]:
        return _read_tar_members(fs, join(root, shard), set(shards[shard]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for shard, found in zip(shards, pool.map(read_shard, shards), strict=True):
            for member, i in shards[shard].items():
                images[i] = found.get(member)
    return images


def _read_tar_members(fs: AbstractFileSystem, path: str, members: set[str]) -> dict[str, bytes]:
    """Read some members of a tar shard, stopping once all are found: a shard can be gigabytes,
    and tarfile seeks past the members it skips (ranged reads on an object store)."""
    found: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if info.name in members and info.isfile():
                    extracted = tar.extractfile(info)
                    if extracted is not None:
                        found[info.name] = extracted.read()
                    if len(found) == len(members):
                        break
    except (OSError, tarfile.TarError) as error:
        logger.warning("cannot read the samples from %s: %s", path, error)
    return found


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


# Figures from the part records -----------------------------------------------------------------


def _calls(parts: list[dict[str, Any]]) -> np.ndarray:
    """Every model call of every part as rows of (images, seconds, end epoch)."""
    calls = [call[:3] for part in parts for call in part.get("calls") or [] if len(call) >= 3]
    return np.asarray(calls, dtype=np.float64).reshape(-1, 3)


def throughput_series(parts: list[dict[str, Any]], *, max_bins: int = 80) -> ThroughputSeries | None:
    """Cumulative images at each call's end, and images/s in time bins. A call's images are
    spread over its duration, so bins shorter than a call show the rate, not batch-end spikes."""
    calls = _calls(parts)
    if not len(calls):
        return None
    images, seconds, ends = calls[:, 0], np.maximum(calls[:, 1], 0.0), calls[:, 2]
    starts = ends - seconds
    t0 = float(starts.min())
    order = np.argsort(ends, kind="stable")
    span = max(float(ends.max()) - t0, 1e-6)
    typical = float(np.median(seconds)) or span
    bins = int(min(max_bins, max(10, round(span / typical))))
    edges = np.linspace(0.0, span, bins + 1)
    done = np.zeros(bins + 1)
    for chunk in range(0, len(calls), 20_000):  # calls x edges at a time, bounded memory
        s, e = starts[chunk : chunk + 20_000, None] - t0, ends[chunk : chunk + 20_000, None] - t0
        fraction = np.clip((edges[None, :] - s) / np.maximum(e - s, 1e-9), 0.0, 1.0)
        done += (fraction * images[chunk : chunk + 20_000, None]).sum(axis=0)
    return ThroughputSeries(
        finished_at=ends[order] - t0,
        cumulative=np.cumsum(images[order]),
        bin_edges=edges,
        images_per_second=np.diff(done) / np.diff(edges),
    )


def actor_summaries(parts: list[dict[str, Any]]) -> list[ActorSummary]:
    """Each generator actor over every part (from its first call's start to its last call's end)."""
    merged: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"node": "", "gpu": "", "rows": 0, "calls": 0, "busy": 0.0, "start": math.inf, "end": -math.inf,
                 "util_seconds": 0.0, "util_sum": 0.0, "peak": None}
    )  # fmt: skip
    for part in parts:
        for actor, worker in (part.get("workers") or {}).items():
            m = merged[actor]
            m["node"], m["gpu"] = str(worker.get("node") or m["node"]), str(worker.get("gpu") or m["gpu"])
            m["rows"] += int(worker.get("rows", 0))
            m["calls"] += int(worker.get("calls", 0))
            m["busy"] += float(worker.get("busy_seconds", 0.0))
            m["start"] = min(m["start"], float(worker.get("first_start", math.inf)))
            m["end"] = max(m["end"], float(worker.get("last_end", -math.inf)))
            m["util_seconds"] += float(worker.get("utilization_seconds") or 0.0)
            m["util_sum"] += float(worker.get("utilization_sum") or 0.0)
            if worker.get("gpu_memory_peak_mb") is not None:
                m["peak"] = max(m["peak"] or 0.0, float(worker["gpu_memory_peak_mb"]))
    summaries = [
        ActorSummary(
            actor=actor,
            node=m["node"],
            gpu=m["gpu"],
            rows=m["rows"],
            calls=m["calls"],
            busy_seconds=m["busy"],
            span_seconds=m["end"] - m["start"] if m["end"] > m["start"] else 0.0,
            gpu_utilization_percent=m["util_sum"] / m["util_seconds"] if m["util_seconds"] else None,
            gpu_memory_peak_mb=m["peak"],
        )
        for actor, m in merged.items()
    ]
    return sorted(summaries, key=lambda a: (a.node, a.actor))


def stage_breakdown(parts: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Busy seconds per stage, summed over every part and actor, in pipeline order."""
    phases: dict[str, float] = defaultdict(float)
    for part in parts:
        for phase, seconds in (part.get("stage_seconds") or {}).items():
            phases[phase] += float(seconds)
    generate = sum(float(p.get("generation_seconds", 0.0)) for p in parts)
    stages = [(PHASES[p], phases.pop(p)) for p in PHASES if p in phases]
    stages += [(p.replace("_", " ").capitalize(), s) for p, s in sorted(phases.items())]
    other = generate - sum(s for _, s in stages)
    if other > 0.01 * max(generate, 1e-9):  # time in the generator outside the timed phases
        stages.append(("Other generation", other))
    stages.append(("Image encoding", sum(float(p.get("encode_seconds", 0.0)) for p in parts)))
    stages.append(("Upload", sum(float(p.get("upload_seconds", 0.0)) for p in parts)))
    return stages


def summarise_parts(parts: list[dict[str, Any]], job: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of `stats.json` rebuilt from the part records, for an output without one
    (a run that was interrupted): wall time runs from the first model call to the last commit."""
    calls = _calls(parts)
    rows = sum(int(p.get("rows", 0)) for p in parts)
    generation = sum(float(p.get("generation_seconds", 0.0)) for p in parts)
    actors = actor_summaries(parts)
    summary: dict[str, Any] = {
        "rows": rows,
        "parts": len(parts),
        "bytes": sum(int(p.get("bytes", 0)) for p in parts),
        "model_calls": len(calls),
        "seconds_per_image": generation / rows if rows else 0.0,
        "peak_memory_mb": max((float(p.get("peak_memory_mb", 0.0)) for p in parts), default=0.0),
        "oom_retries": sum(int(p.get("oom_retries", 0)) for p in parts),
        "prompts_truncated": sum(int(p.get("prompts_truncated", 0)) for p in parts),
    }
    if len(calls):
        start, end = float((calls[:, 2] - calls[:, 1]).min()), float(calls[:, 2].max())
        committed = max((float(p.get("committed_at", end)) for p in parts), default=end)
        summary["wall_seconds"] = max(committed, end) - start
        summary["images_per_second"] = rows / summary["wall_seconds"] if summary["wall_seconds"] > 0 else 0.0
        summary["generation_images_per_second"] = rows / (end - start) if end > start else 0.0
        values = np.percentile(calls[:, 1], PERCENTILES)
        summary["batch_latency_seconds"] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
    spans = sum(a.span_seconds for a in actors)
    summary["busy_fraction"] = min(1.0, sum(a.busy_seconds for a in actors) / spans) if spans > 0 else None
    peaks = [a.gpu_memory_peak_mb for a in actors if a.gpu_memory_peak_mb is not None]
    summary["peak_gpu_memory_mb"] = max(peaks) if peaks else None
    utilized = [(a.gpu_utilization_percent, a.busy_seconds) for a in actors if a.gpu_utilization_percent is not None]
    weight = sum(w for _, w in utilized)
    summary["gpu_utilization_percent"] = sum(u * w for u, w in utilized) / weight if weight else None
    config = (job or {}).get("config") or {}
    summary["manifest_rows"] = (job or {}).get("manifest_rows")
    summary["batch_size"] = (config.get("generation") or {}).get("batch_size")
    summary["actors"] = (config.get("resources") or {}).get("actors")
    summary["layout"] = (config.get("write") or {}).get("layout")
    return summary


# Plots -----------------------------------------------------------------------------------------


@contextmanager
def _plot_style(name: str) -> Iterator[None]:
    """The plots' look. Figures are built without pyplot, so no backend or GUI is involved and no
    global state changes: `savefig` renders with matplotlib's own SVG canvas."""
    import matplotlib

    style: dict[Any, Any] = {
        "svg.fonttype": "none",  # text stays text: smaller, and drawn in the page's font
        "svg.hashsalt": name,  # the ids of clip paths and markers stay unique across the page's plots
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"],
        "font.size": 9,
        "axes.edgecolor": "#cbd5e1",
        "axes.labelcolor": INK,
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "axes.titlelocation": "left",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e2e8f0",
        "grid.linewidth": 0.8,
        "xtick.color": "#475569",
        "ytick.color": "#475569",
    }
    with matplotlib.rc_context(style):
        yield


def _svg(figure: Figure) -> str:
    """The figure as an SVG element to inline in HTML: no XML prolog, no doctype, no namespace or
    metadata URLs (HTML parsing puts <svg> in its namespace), and no size, so CSS can scale it."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    document = buffer.getvalue()
    root, body = document[document.index("<svg") :].split(">", 1)
    root = re.sub(r'\s(?:xmlns(?::\w+)?|width|height|version)="[^"]*"', "", root)
    # matplotlib numbers its groups per figure (figure_1, axes_1...): unused, and would repeat.
    return re.sub(r'<g id="[^"]*"', "<g", f"{root}>{body}")


def _time_unit(span: float) -> tuple[str, float]:
    if span >= 3 * 3600:
        return "hours", 3600.0
    if span >= 600:
        return "minutes", 60.0
    return "seconds", 1.0


def plot_throughput(series: ThroughputSeries) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    unit, scale = _time_unit(series.span)
    with _plot_style("throughput"):
        figure = Figure(figsize=(11, 3.1), layout="constrained")
        cumulative, rate = figure.subplots(1, 2)
        end = 1.02 * series.span / scale  # a little room, so the last call's step is not drawn on the frame
        # At most ~2,000 steps: a million-row job has 100,000s of calls, more than the plot has pixels.
        keep = np.unique(np.linspace(0, len(series.cumulative) - 1, min(len(series.cumulative), 2000)).astype(int))
        x = np.concatenate([[0.0], series.finished_at[keep] / scale, [end]])
        y = np.concatenate([[0.0], series.cumulative[keep], series.cumulative[-1:]])
        cumulative.step(x, y, where="post", color=BLUE, linewidth=1.8)
        cumulative.fill_between(x, y, step="post", color=BLUE, alpha=0.12, linewidth=0)
        cumulative.set(title="Images finished", xlabel=f"{unit} since the first model call", ylabel="images")
        cumulative.set_xlim(0, end)
        cumulative.set_ylim(0, None)
        cumulative.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        edges = series.bin_edges / scale
        rate.stairs(series.images_per_second, edges, fill=True, color=ORANGE, alpha=0.35)
        rate.stairs(series.images_per_second, edges, color=ORANGE, linewidth=1.5)
        mean = float(series.cumulative[-1]) / series.span if series.span > 0 else 0.0
        rate.axhline(mean, color=INK, linestyle="--", linewidth=1, label=f"mean {mean:.3g} images/s")
        rate.set(title="Images per second", xlabel=f"{unit} since the first model call", ylabel="images/s")
        rate.set_xlim(0, end)
        rate.set_ylim(0, None)
        rate.legend(loc="lower right", framealpha=0.85, edgecolor="none")
        return _svg(figure)


def plot_actors(actors: list[ActorSummary]) -> str:
    from matplotlib.figure import Figure

    shown = sorted(actors, key=lambda a: -a.rows)[:MAX_ACTORS_PLOTTED]
    shown.sort(key=lambda a: (a.node, a.actor), reverse=True)  # barh draws bottom-up: first actor on top
    labels = [a.label for a in shown]
    with _plot_style("actors"):
        figure = Figure(figsize=(11, 0.9 + 0.3 * len(shown)), layout="constrained")
        rows, rate = figure.subplots(1, 2, sharey=True)
        rows.barh(labels, [a.rows for a in shown], color=BLUE, height=0.6)
        rows.set(title="Rows rendered", xlabel="rows")
        rate.barh(labels, [a.images_per_second for a in shown], color=ORANGE, height=0.6)
        rate.set(title="Images per second (first call start to last call end)", xlabel="images/s")
        for axis in (rows, rate):
            axis.grid(axis="y", visible=False)
            axis.tick_params(axis="y", length=0)
        return _svg(figure)


def plot_stages(stages: list[tuple[str, float]]) -> str:
    from matplotlib.figure import Figure

    total = sum(s for _, s in stages) or 1.0
    with _plot_style("stages"):
        figure = Figure(figsize=(6.2, 0.7 + 0.34 * len(stages)), layout="constrained")
        axis = figure.subplots()
        names = [name for name, _ in reversed(stages)]
        seconds = [s for _, s in reversed(stages)]
        colors = [GREY if name in ("Image encoding", "Upload", "Other generation") else BLUE for name in names]
        bars = axis.barh(names, seconds, color=colors, height=0.6)
        axis.bar_label(bars, labels=[f"{100 * s / total:.1f} %" for s in seconds], padding=3, color=INK, fontsize=8)
        axis.set(xlabel="busy seconds, summed over actors")
        axis.set_xlim(0, max(seconds, default=1.0) * 1.18 or 1.0)
        axis.grid(axis="y", visible=False)
        axis.tick_params(axis="y", length=0)
        return _svg(figure)


# The page --------------------------------------------------------------------------------------


def _short(text: str, n: int) -> str:
    """A short, plain label: plot text must not carry markup or mathtext (`$`)."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", text)[:n] or "?"


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
    ("Speed", "Images/s, wall time", "images_per_second", "{:.3g}".format),
    ("Speed", "Images/s, generating", "generation_images_per_second", "{:.3g}".format),
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


def _figures(contents: OutputContents) -> tuple[dict[str, Any], list[str]]:
    """The summary figures (stats.json, else rebuilt from the parts) and notes on where they come from."""
    notes = []
    summary = contents.stats
    if summary is None:
        notes.append(
            f"No {STATS_FILE} (the last run did not finish, or predates it): the summary is rebuilt from the "
            f"{len(contents.parts):,} per-part stats records; its wall time runs from the first model call to the "
            "last commit."
        )
        summary = summarise_parts(contents.parts, contents.job)
    if not contents.parts:
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


def render_report(contents: OutputContents) -> str:
    """The report page as one HTML string, everything embedded. Every value from the output
    (prompts, ids, paths) is escaped by the template; only our own SVG is inserted as markup."""
    from jinja2 import Environment, StrictUndefined
    from markupsafe import Markup

    figures, notes = _figures(contents)
    groups = summary_groups(figures)
    shown = dict(item for _, items in groups for item in items)
    labels = {key: label for _, label, key, _ in SUMMARY_FIELDS}
    series = throughput_series(contents.parts)
    actors = actor_summaries(contents.parts)
    stages = stage_breakdown(contents.parts) if contents.parts else []
    stage_total = sum(seconds for _, seconds in stages) or 1.0
    rows = max(sum(int(p.get("rows", 0)) for p in contents.parts), 1)
    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(_TEMPLATE).render(
        output=contents.output,
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        notes=notes,
        tiles=[(shown[labels[key]], caption) for key, caption in HEADLINE if labels[key] in shown],
        groups=groups,
        throughput=Markup(plot_throughput(series)) if series is not None else None,
        calls=len(_calls(contents.parts)),
        actors=actors,
        actors_plot=Markup(plot_actors(actors)) if actors else None,
        actors_hidden=max(0, len(actors) - MAX_ACTORS_PLOTTED),
        stages=[(name, seconds, 100 * seconds / stage_total, 1000 * seconds / rows) for name, seconds in stages],
        stages_plot=Markup(plot_stages(stages)) if stages else None,
        samples=_sample_cards(contents),
        sample_total=contents.metadata_rows,
    )


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdxl-batch report: {{ output }}</title>
<style>
  :root { --ink: #1e293b; --muted: #64748b; --line: #e2e8f0; --panel: #f8fafc; --blue: #2563eb; }
  * { box-sizing: border-box; }
  body { margin: 0; background: #fff; color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", sans-serif; }
  main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
  header { border-bottom: 3px solid var(--blue); padding-bottom: 14px; margin-bottom: 8px; }
  h1 { font-size: 24px; margin: 0 0 4px; letter-spacing: -0.01em; }
  h2 { font-size: 17px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
  h3 { font-size: 12px; margin: 0 0 6px; text-transform: uppercase; letter-spacing: 0.06em; color: var(--muted); }
  .sub { color: var(--muted); margin: 0; font-size: 13px; overflow-wrap: anywhere; }
  .sub code { color: var(--ink); }
  code, .mono { font-family: "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
  .note { background: #fffbeb; border: 1px solid #fde68a; border-radius: 6px; padding: 8px 12px; margin: 12px 0 0; }
  .tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin: 18px 0 16px; }
  .tile { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
  .tile .value { font-size: 26px; font-weight: 650; color: var(--blue); font-variant-numeric: tabular-nums; }
  .tile .label { color: var(--muted); font-size: 12px; }
  .groups { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 12px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  td, th { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; }
  td.num, th.num { text-align: right; white-space: nowrap; }
  .kv td { font-size: 13px; padding: 4px 6px; }
  .kv td:first-child { color: var(--muted); white-space: nowrap; width: 1%; padding-right: 14px; }
  .kv td:last-child { overflow-wrap: anywhere; }
  .plot svg { width: 100%; height: auto; display: block; }
  .caption { color: var(--muted); font-size: 12px; margin: 4px 0 0; }
  .split { display: grid; grid-template-columns: 1.25fr 1fr; gap: 24px; align-items: start; }
  .scroll { max-height: 420px; overflow: auto; margin-top: 12px; }
  .sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 14px; }
  figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; background: var(--panel); }
  figure img { display: block; width: 100%; height: auto; background: #e2e8f0; }
  figure .missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
                    color: var(--muted); background: #f1f5f9; }
  figcaption { padding: 8px 10px 10px; font-size: 12px; }
  figcaption .id { font-weight: 600; overflow-wrap: anywhere; }
  figcaption .meta { color: var(--muted); }
  figcaption .prompt { margin-top: 4px; display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical;
                       overflow: hidden; overflow-wrap: anywhere; }
  footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
  @media (max-width: 1000px) { .groups { grid-template-columns: 1fr 1fr; } }
  @media (max-width: 800px) { .split, .groups { grid-template-columns: 1fr; } main { padding: 16px; } }
</style>
</head>
<body>
<main>
<header>
  <h1>sdxl-batch report</h1>
  <p class="sub">Output <code>{{ output }}</code> &middot; generated {{ generated_at }}</p>
  {% for note in notes %}
  <p class="note">{{ note }}</p>
  {% endfor %}
</header>

<section id="summary">
  <h2>Summary</h2>
  <div class="tiles">
    {% for value, label in tiles %}
    <div class="tile"><div class="value">{{ value }}</div><div class="label">{{ label }}</div></div>
    {% endfor %}
  </div>
  <div class="groups">
    {% for title, items in groups %}
    <div>
      <h3>{{ title }}</h3>
      <table class="kv">
        {% for label, value in items %}
        <tr><td>{{ label }}</td><td>{{ value }}</td></tr>
        {% endfor %}
      </table>
    </div>
    {% endfor %}
  </div>
</section>

<section id="throughput">
  <h2>Throughput over time</h2>
  {% if throughput %}
  <div class="plot">{{ throughput }}</div>
  <p class="caption">From the end times of {{ "{:,}".format(calls) }} model calls across every committed part.
    Images per second spreads each call's images over its duration.</p>
  {% else %}
  <p>No model calls recorded.</p>
  {% endif %}
</section>

<section id="actors">
  <h2>Per actor</h2>
  {% if actors_plot %}
  <div class="plot">{{ actors_plot }}</div>
  {% if actors_hidden %}<p class="caption">The plot shows the {{ actors|length - actors_hidden }} actors with the
    most rows; the table lists all {{ actors|length }}.</p>{% endif %}
  <div class="scroll">
  <table>
    <tr><th>actor</th><th>node</th><th>GPU</th><th class="num">rows</th><th class="num">model calls</th>
      <th class="num">images/s</th><th class="num">busy</th><th class="num">GPU util.</th>
      <th class="num">GPU memory</th></tr>
    {% for a in actors %}
    <tr><td class="mono" title="{{ a.actor }}">{{ a.actor[:12] }}</td>
      <td class="mono" title="{{ a.node }}">{{ a.node[:12] }}</td><td>{{ a.gpu or "–" }}</td>
      <td class="num">{{ "{:,}".format(a.rows) }}</td><td class="num">{{ "{:,}".format(a.calls) }}</td>
      <td class="num">{{ "%.3g"|format(a.images_per_second) }}</td>
      <td class="num">{{ "%.0f %%"|format(100 * a.busy_fraction) if a.busy_fraction is not none else "–" }}</td>
      <td class="num">{{ "%.0f %%"|format(a.gpu_utilization_percent)
                         if a.gpu_utilization_percent is not none else "–" }}</td>
      <td class="num">{{ "{:,.0f} MiB".format(a.gpu_memory_peak_mb) if a.gpu_memory_peak_mb is not none
                         else "–" }}</td></tr>
    {% endfor %}
  </table>
  </div>
  {% else %}
  <p>No per-actor records.</p>
  {% endif %}
</section>

<section id="stages">
  <h2>Stage breakdown</h2>
  {% if stages %}
  <div class="split">
    <div class="plot">{{ stages_plot }}</div>
    <div>
      <table>
        <tr><th>stage</th><th class="num">busy seconds</th><th class="num">share</th>
          <th class="num">ms per image</th></tr>
        {% for name, seconds, share, per_image in stages %}
        <tr><td>{{ name }}</td><td class="num">{{ "%.3f"|format(seconds) }}</td>
          <td class="num">{{ "%.1f %%"|format(share) }}</td><td class="num">{{ "%.1f"|format(per_image) }}</td></tr>
        {% endfor %}
      </table>
      <p class="caption">Busy seconds summed over actors and parts (not wall time). Text encode to to-host are the
        generator's phases (synchronised on CUDA); image encoding turns pixels into files; upload writes a part.</p>
    </div>
  </div>
  {% else %}
  <p>No stage timings recorded.</p>
  {% endif %}
</section>

<section id="samples">
  <h2>Sample images</h2>
  <p class="caption" style="margin: -4px 0 12px">{{ samples|length }} of {{ "{:,}".format(sample_total) }} rows,
    spread evenly over the ids and sorted by id.</p>
  <div class="sheet">
    {% for s in samples %}
    <figure>
      {% if s.src %}
      <img src="{{ s.src }}" width="{{ s.width }}" height="{{ s.height }}" alt="{{ s.prompt }}">
      {% else %}
      <div class="missing">image unreadable</div>
      {% endif %}
      <figcaption>
        <div class="id mono">{{ s.id }}</div>
        <div class="meta">seed {{ s.seed }}{% if s.size %} &middot; {{ s.size }}{% endif %}</div>
        <div class="prompt" title="{{ s.prompt }}">{{ s.prompt }}</div>
      </figcaption>
    </figure>
    {% endfor %}
  </div>
</section>

<footer>Written by <code>sdxl-batch report</code>. Self-contained: every figure and image is embedded in this file.
</footer>
</main>
</body>
</html>
"""

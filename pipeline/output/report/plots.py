"""The report's plots: matplotlib figures rendered to inline SVG, in the page's colours and font."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.output.report.figures import ThroughputSeries
    from pipeline.output.stats import WorkerStats

MAX_ACTORS_PLOTTED = 48
BLUE, ORANGE, GREY, INK = "#2563eb", "#f59e0b", "#94a3b8", "#1e293b"


def _short(text: str, n: int) -> str:
    """A short, plain label: plot text must not carry markup or mathtext (`$`)."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", text)[:n] or "?"


def actor_label(actor: str, worker: WorkerStats) -> str:
    gpu = f" gpu {_short(worker.gpu, 4)}" if worker.gpu else ""
    return f"{_short(actor, 8)} @ {_short(worker.node, 8)}{gpu}"


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


def plot_actors(actors: list[tuple[str, WorkerStats]]) -> str:
    from matplotlib.figure import Figure

    shown = sorted(actors, key=lambda item: -item[1].rows)[:MAX_ACTORS_PLOTTED]
    shown.sort(key=lambda item: (item[1].node, item[0]), reverse=True)  # barh draws bottom-up: first actor on top
    labels = [actor_label(actor, worker) for actor, worker in shown]
    with _plot_style("actors"):
        figure = Figure(figsize=(11, 0.9 + 0.3 * len(shown)), layout="constrained")
        rows, rate = figure.subplots(1, 2, sharey=True)
        rows.barh(labels, [worker.rows for _, worker in shown], color=BLUE, height=0.6)
        rows.set(title="Rows rendered", xlabel="rows")
        rate.barh(labels, [worker.images_per_second for _, worker in shown], color=ORANGE, height=0.6)
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

"""`tune.html`: the record of a `tune` run (`tune.json`) as one self-contained page beside it.

`tune.json` holds every measurement, but a sweep is read as curves: where images/s stops growing
with the batch size, where memory runs out, which precision or kernel is worth its switch. So the
page draws, per GPU type and per precision, images/s against batch size (one line per load
setting, with its spread), and lists every measurement under it. It reuses the job report's look:
plots drawn without pyplot in the report's style and inlined as SVG (`output.report.plots`), and a
Jinja2 template with autoescaping, kept here as a string. Type names, statuses and notes come from
clusters and users, so everything shown is escaped by the template and plot text is made plain
(matplotlib would read `$...$` as mathtext); only the SVG we draw goes in as markup.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.output.report.page import _seconds, _timestamp
from pipeline.output.report.plots import BLUE, GREY, INK, ORANGE, _plot_style, _short, _svg

if TYPE_CHECKING:
    from jinja2 import Template
    from matplotlib.axes import Axes

RED = "#dc2626"
UNMEASURED = {"infeasible": RED, "failed": INK}  # how a point that did not run is drawn, by its status
# One colour per load setting; red is kept for the infeasible points and grey for the rejected.
PALETTE = (BLUE, ORANGE, "#16a34a", "#9333ea", "#0891b2", "#db2777", "#65a30d", "#a16207")
DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2}
NO_FLEET = (
    "No fleet setting: no precision/attention/compile setting passed on every type, so each type would "
    "render different pixels. Run the types as separate jobs, each with its own best setting below."
)


def write_tune_page(record: dict[str, Any], path: Path) -> Path:
    """Write the page of a `tune` record (the `tune.json` dict) to `path`.

    Args:
        record: The `tune.json` document.
        path: Where to write the page, conventionally `tune.html` beside `tune.json`.

    Returns:
        `path`, so the caller can print where the page is.
    """
    path.write_text(render_tune_page(record), encoding="utf-8")
    return path


def render_tune_page(record: dict[str, Any]) -> str:
    """The page of a `tune` record as one HTML string, with its CSS and plots embedded.

    Every key is read with a default: a record from an interrupted run or an older version still
    renders what it has rather than failing the command that measured it.
    """
    trials: list[dict[str, Any]] = list(record.get("trials") or [])
    best: dict[str, Any] = record.get("best") or {}
    sections = [
        _type_section(name, [t for t in trials if t.get("accelerator_type") == name], best.get(name))
        for name in _type_names(record, trials)
    ]
    return _template().render(
        header=_header(record),
        measured=any(_ok(t) for t in trials),
        trial_count=len(trials),
        fleet=_fleet(record.get("fleet")),
        no_fleet=NO_FLEET,
        sections=sections,
    )


# ---------------------------------------------------------------------------------------- facts


def _ok(trial: dict[str, Any]) -> bool:
    return bool(trial.get("status") == "ok")


def _rejected(trial: dict[str, Any]) -> bool:
    """Measured but turned down by the quality gate: drawn, never chosen."""
    return _ok(trial) and trial.get("quality_passed") is False


def _settings(trial: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = trial.get("settings") or {}
    return settings


def _batch_size(trial: dict[str, Any]) -> int:
    return int(_settings(trial).get("batch_size") or 1)


def _dtype(trial: dict[str, Any]) -> str:
    return str(_settings(trial).get("dtype") or "?")


def _is_best(trial: dict[str, Any], best: dict[str, Any] | None) -> bool:
    return best is not None and (trial.get("load_key"), trial.get("batch_key")) == (
        best.get("load_key"),
        best.get("batch_key"),
    )


def _type_names(record: dict[str, Any], trials: list[dict[str, Any]]) -> list[str]:
    """The types of the run, then any type only the trials name (a hand-merged record)."""
    names = [str(name) for name in record.get("types") or {}]
    for trial in trials:
        name = str(trial.get("accelerator_type"))
        if name not in names:
            names.append(name)
    return names


# ------------------------------------------------------------------------------------ formatting


def _rate(trial: dict[str, Any]) -> str:
    if not _ok(trial):
        return "–"
    return f"{trial.get('images_per_second') or 0.0:.3g} ± {trial.get('spread') or 0.0:.2g}"


def _memory(trial: dict[str, Any]) -> str:
    peak, fraction = trial.get("peak_memory_mb"), trial.get("memory_fraction")
    if peak is None:
        return "–"
    return f"{peak:,.0f}" + (f" ({100 * fraction:.0f} %)" if fraction is not None else "")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _quality(trial: dict[str, Any]) -> str:
    value, passed = trial.get("quality"), trial.get("quality_passed")
    if not _ok(trial):  # the load's verdict is copied to every point; it says nothing of one that did not run
        return "–"
    if passed is None:
        return "–" if value is None else f"{value:.2f}"
    # A verdict without a value: identical to the reference (an infinite PSNR is stored as null).
    shown = "same" if value is None else f"{value:.2f}"
    return f"{shown} {'pass' if passed else 'rejected'}"


def _money(value: float | None, digits: int) -> str:
    return "–" if value is None else f"${value:.{digits}f}"


def _switch(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


# ------------------------------------------------------------------------------- page sections


def _header(record: dict[str, Any]) -> dict[str, Any]:
    occupancy = record.get("occupancy") or {}
    quality = record.get("quality") or {}
    wall = record.get("wall_seconds")
    types = [
        {
            "name": str(name),
            "gpus": info.get("gpus", "–"),
            "nodes": info.get("nodes", "–"),
            "cpus_per_gpu": "–" if info.get("cpus_per_gpu") is None else f"{info['cpus_per_gpu']:g}",
            "price": _money(info.get("price"), 2),
        }
        for name, info in (record.get("types") or {}).items()
    ]
    return {
        "created_at": _timestamp(str(record.get("created_at") or "?")),
        "search": str(record.get("search") or "?"),
        "wall": "–" if wall is None else _seconds(float(wall)),
        "occupancy_trials": _percent(occupancy.get("trials")),
        "occupancy_command": _percent(occupancy.get("command")),
        "quality": f"{quality['metric']}, threshold {quality.get('threshold')}" if quality.get("metric") else "–",
        "types": types,
    }


def _fleet(fleet: dict[str, Any] | None) -> dict[str, Any] | None:
    if not fleet:
        return None
    rows = []
    for name, chosen in (fleet.get("types") or {}).items():
        gpus = chosen.get("gpus") or 0
        rows.append({
            "name": str(name),
            "load_key": chosen.get("load_key", "?"),
            "batch_key": chosen.get("batch_key", "?"),
            "rate": _rate(chosen),
            "gpus": gpus,
            "total": f"{gpus * (chosen.get('images_per_second') or 0.0):.4g}",
            "reason": chosen.get("reason", ""),
        })  # fmt: skip
    pixels = fleet.get("pixels") or {}
    return {
        "pixels": " · ".join(f"{key} {_switch(value)}" for key, value in pixels.items()),
        "images_per_second": f"{fleet.get('images_per_second') or 0.0:.4g}",
        "types": rows,
    }


def _table_row(trial: dict[str, Any], best: dict[str, Any] | None) -> dict[str, Any]:
    status = str(trial.get("status") or "?")
    return {
        "load_key": str(trial.get("load_key") or "?"),
        "batch_key": str(trial.get("batch_key") or "?"),
        "rate": _rate(trial),
        "memory": _memory(trial),
        "busy": _percent(trial.get("busy_fraction")),
        "bottleneck": trial.get("bottleneck") or "–",
        "quality": _quality(trial),
        "cost": _money(trial.get("cost_per_1000"), 3),
        "status": status,
        "note": str(trial.get("note") or ""),
        "cached": bool(trial.get("cached")),
        "best": _is_best(trial, best),
        "kind": "rejected" if _rejected(trial) else status.split(":", 1)[0],
    }


def _type_section(name: str, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """One type's plots (one per precision) and table (every measurement, best marked)."""
    from markupsafe import Markup

    dtypes = sorted({_dtype(t) for t in trials}, key=lambda d: (DTYPE_ORDER.get(d, len(DTYPE_ORDER)), d))
    plots = [
        (dtype, Markup(plot_rates(name, dtype, [t for t in trials if _dtype(t) == dtype], best))) for dtype in dtypes
    ]
    ordered = sorted(trials, key=lambda t: (dtypes.index(_dtype(t)), str(t.get("load_key")), _batch_size(t)))
    unmeasured = [t for t in trials if not _ok(t)]
    return {
        "name": name,
        "best": best,
        "best_rate": _rate(best) if best else "",
        "plots": plots,
        "rows": [_table_row(t, best) for t in ordered],
        "unmeasured": [(str(t.get("load_key")), str(t.get("batch_key")), str(t.get("status"))) for t in unmeasured],
    }


# ------------------------------------------------------------------------------------------ plot


def plot_rates(name: str, dtype: str, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """Images/s against batch size for one type and precision, as inline SVG.

    Batch sizes grow in powers of two, so the axis is log2 with the measured sizes as its ticks.
    Points that did not run sit at zero as crosses (red: infeasible; dark: failed), so a sweep
    that ran out of memory shows where; the table and the caption say why.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    with _plot_style(f"tune-{name}-{dtype}"):
        figure = Figure(figsize=(7.6, 3.3), layout="constrained")
        axis = figure.subplots()
        loads = sorted({str(t.get("load_key")) for t in trials if _ok(t)})
        for index, key in enumerate(loads):
            _draw_load(axis, key, [t for t in trials if _ok(t) and str(t.get("load_key")) == key], index)
        _draw_unmeasured(axis, [t for t in trials if not _ok(t)])
        if best is not None and _dtype(best) == dtype and _ok(best):
            _mark_best(axis, best)
        sizes = sorted({_batch_size(t) for t in trials})
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, labels=[str(size) for size in sizes])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
        top = max(((t.get("images_per_second") or 0.0) + (t.get("spread") or 0.0) for t in trials if _ok(t)), default=0)
        axis.set_ylim(0, max(1.15 * top, 1.0))
        axis.set(title=f"{_short(name, 24)} {_short(dtype, 12)}", xlabel="batch size", ylabel="images/s per GPU")
        _legend(axis)
        return _svg(figure)


def _legend(axis: Axes) -> None:
    """The load settings first, then the crosses (matplotlib lists the crosses first)."""
    entries = sorted(zip(*axis.get_legend_handles_labels(), strict=True), key=lambda e: e[1] in UNMEASURED)
    if entries:
        handles, labels = zip(*entries, strict=True)
        axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)


def _draw_load(axis: Axes, key: str, trials: list[dict[str, Any]], index: int) -> None:
    """One load setting's line; a load the quality gate rejected is hollow, grey and dashed."""
    trials = sorted(trials, key=lambda t: (_batch_size(t), t.get("images_per_second") or 0.0))
    rejected = any(_rejected(t) for t in trials)
    color = GREY if rejected else PALETTE[index % len(PALETTE)]
    axis.errorbar(
        [_batch_size(t) for t in trials],
        [t.get("images_per_second") or 0.0 for t in trials],
        yerr=[t.get("spread") or 0.0 for t in trials],
        fmt="o--" if rejected else "o-",
        color=color,
        markerfacecolor="white" if rejected else color,
        markersize=5,
        capsize=3,
        linewidth=1.4,
        label=_short(key, 40) + (" (rejected: quality)" if rejected else ""),
    )


def _draw_unmeasured(axis: Axes, trials: list[dict[str, Any]]) -> None:
    for kind, color in UNMEASURED.items():
        shown = [t for t in trials if str(t.get("status") or "").startswith(kind)]
        if shown:
            sizes = [_batch_size(t) for t in shown]
            axis.scatter(sizes, [0.0] * len(sizes), marker="x", s=45, color=color, clip_on=False, zorder=4, label=kind)


def _mark_best(axis: Axes, best: dict[str, Any]) -> None:
    x, y = _batch_size(best), best.get("images_per_second") or 0.0
    axis.scatter([x], [y], s=260, facecolors="none", edgecolors=INK, linewidths=1.4, zorder=5)
    axis.annotate("best", (x, y), xytext=(9, 9), textcoords="offset points", fontsize=8, fontweight="bold", color=INK)


# -------------------------------------------------------------------------------------- template


@functools.cache
def _template() -> Template:
    """The page's template: autoescape on, as the report's, and strict about missing values."""
    from jinja2 import Environment, StrictUndefined

    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(TEMPLATE)


TEMPLATE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdxl-batch tune: {{ header.created_at }}</title>
<style>
  :root { --ink: #1e293b; --muted: #64748b; --line: #e2e8f0; --panel: #f8fafc; --blue: #2563eb; }
  body { margin: 0; color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", sans-serif; }
  main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
  header { border-bottom: 3px solid var(--blue); padding-bottom: 14px; }
  h1 { font-size: 24px; margin: 0 0 4px; }
  h2 { font-size: 17px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
  h3 { font-size: 13px; margin: 18px 0 6px; color: var(--muted); }
  .sub, .caption { color: var(--muted); margin: 0; font-size: 13px; overflow-wrap: anywhere; }
  .caption { font-size: 12px; margin-top: 4px; }
  code, .mono { font-family: "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
  .note { background: #fffbeb; border: 1px solid #fde68a; border-radius: 6px; padding: 8px 12px; margin: 12px 0 0; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin-top: 8px; }
  td, th { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; }
  td.num, th.num { text-align: right; white-space: nowrap; }
  tr.best td { background: #eff6ff; font-weight: 600; }
  tr.infeasible td, tr.failed td, tr.rejected td { color: var(--muted); }
  .tag { font-size: 11px; border-radius: 4px; padding: 0 5px; background: var(--blue); color: #fff; }
  .tag.cached { background: var(--line); color: var(--ink); }
  .plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
  .plot svg { width: 100%; height: auto; display: block; }
  .scroll { max-height: 520px; overflow: auto; }
  footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<main>
<header>
  <h1>sdxl-batch tune</h1>
  <p class="sub">Run {{ header.created_at }} (UTC) &middot; search <code>{{ header.search }}</code>
    &middot; wall time {{ header.wall }} &middot; occupancy: trials {{ header.occupancy_trials }},
    whole command {{ header.occupancy_command }} &middot; quality gate {{ header.quality }}</p>
  {% if not measured %}
  <p class="note">No measurement ran: {% if trial_count %}every one of the {{ trial_count }} trials was infeasible
    or failed (the tables below say why){% else %}the record holds no trials{% endif %}.</p>
  {% endif %}
  {% if header.types %}
  <table>
    <tr><th>type</th><th class="num">GPUs</th><th class="num">nodes</th><th class="num">CPUs per GPU</th>
      <th class="num">price per GPU-hour</th></tr>
    {% for t in header.types %}
    <tr><td>{{ t.name }}</td><td class="num">{{ t.gpus }}</td><td class="num">{{ t.nodes }}</td>
      <td class="num">{{ t.cpus_per_gpu }}</td><td class="num">{{ t.price }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
</header>

<section id="fleet">
  <h2>Fleet</h2>
  {% if fleet %}
  <p>One pixel setting for every type: <code>{{ fleet.pixels }}</code>, {{ fleet.images_per_second }} images/s
    for the whole fleet.</p>
  <table>
    <tr><th>type</th><th>load setting</th><th>batch</th><th class="num">images/s per GPU</th>
      <th class="num">GPUs</th><th class="num">images/s, all GPUs</th><th>why</th></tr>
    {% for t in fleet.types %}
    <tr><td>{{ t.name }}</td><td class="mono">{{ t.load_key }}</td><td class="mono">{{ t.batch_key }}</td>
      <td class="num">{{ t.rate }}</td><td class="num">{{ t.gpus }}</td><td class="num">{{ t.total }}</td>
      <td>{{ t.reason }}</td></tr>
    {% endfor %}
  </table>
  {% else %}
  <p>{{ no_fleet }}</p>
  {% endif %}
</section>

{% for s in sections %}
<section class="type">
  <h2>{{ s.name }}</h2>
  {% if s.best %}
  <p>Best: <code>{{ s.best.load_key }}</code> <code>{{ s.best.batch_key }}</code>, {{ s.best_rate }} images/s
    per GPU ({{ s.best.reason }}).</p>
  {% else %}
  <p>No eligible point on this type: nothing was measured within the limits and through the quality gate.</p>
  {% endif %}
  {% if s.plots %}
  <div class="plots">
    {% for dtype, svg in s.plots %}
    <div class="plot">{{ svg }}</div>
    {% endfor %}
  </div>
  <p class="caption">Steady images/s per GPU against batch size (log scale), one line per load setting, error
    bars the spread of its repeated windows. Crosses at zero did not run (red: infeasible); hollow grey points
    were rejected by the quality gate; the circle is the chosen point.</p>
  {% if s.unmeasured %}
  <p class="caption">Not measured:
    {% for load, batch, status in s.unmeasured %}{{ load }} {{ batch }} ({{ status }}){{ "; " if not loop.last }}
    {% endfor %}</p>
  {% endif %}
  <div class="scroll">
  <table>
    <tr><th>load setting</th><th>batch</th><th class="num">images/s</th><th class="num">peak MB (memory)</th>
      <th class="num">busy</th><th>bottleneck</th><th class="num">quality</th><th class="num">$/1k images</th>
      <th>status</th></tr>
    {% for r in s.rows %}
    <tr class="{{ r.kind }}{{ ' best' if r.best }}"><td class="mono">{{ r.load_key }}</td>
      <td class="mono">{{ r.batch_key }}</td><td class="num">{{ r.rate }}</td><td class="num">{{ r.memory }}</td>
      <td class="num">{{ r.busy }}</td><td>{{ r.bottleneck }}</td><td class="num">{{ r.quality }}</td>
      <td class="num">{{ r.cost }}</td>
      <td>{% if r.best %}<span class="tag">best</span> {% endif %}{{ r.status }}
        {%- if r.cached %} <span class="tag cached" title="measured by an earlier run">cached</span>{% endif %}
        {%- if r.note %} &middot; {{ r.note }}{% endif %}</td></tr>
    {% endfor %}
  </table>
  </div>
  {% else %}
  <p>No trial ran on this type.</p>
  {% endif %}
</section>
{% endfor %}

<footer>Written by <code>sdxl-batch tune</code> from <code>tune.json</code>. Self-contained: every plot is
  embedded in this file.</footer>
</main>
</body>
</html>
"""

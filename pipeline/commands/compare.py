"""Side-by-side comparison of presets on the same prompts and seeds, as in the source articles.

Each preset renders the whole manifest into `OUTPUT/<preset>/` (a normal, resumable job); then,
per prompt, one grid image puts the presets side by side (a column each, a row per seed) with
the preset and its seconds per image under each tile, and a table compares seconds per image and
peak memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as pads

from pipeline.core.io import filesystem, join, write_bytes
from pipeline.core.layout import COMPARE_FILE, GRIDS_DIR, METADATA_DIR, STATS_FILE, read_json, write_json
from pipeline.models.presets import check_job_settings, get_preset
from pipeline.plan.settings import SettingDefaults
from pipeline.run.progress import JobLine
from pipeline.run.runner import JobResult, run_job

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from PIL import Image

    from pipeline.core.config import JobConfig

TILE = 256
LABEL_HEIGHT = 34
TITLE_HEIGHT = 24


@dataclass(frozen=True)
class CompareResult:
    output: str
    grids: list[str]
    table: str
    stats: dict[str, Any]


def preset_config(config: JobConfig, preset: str) -> JobConfig:
    """The job for one preset: its own steps and guidance, shared size, plain image files."""
    generation = config.generation.model_copy(update={"steps": None, "guidance_scale": None})
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"preset": preset}),
            "generation": generation,
            "write": config.write.model_copy(update={"layout": "files"}),
            "output": join(config.output, preset),
        }
    )


def run_compare(
    config: JobConfig,
    presets: list[str],
    *,
    ray_address: str | None = None,
    progress: bool = True,
    line: JobLine | None = None,
) -> CompareResult:
    """Render the manifest with every preset, then write the grids and the comparison table.
    `line`: the console's progress line, restarted for each preset's job."""
    jobs = {name: preset_config(config, name) for name in presets}
    for job in jobs.values():  # every preset is checked before anything renders
        preset = get_preset(job.model.preset)
        defaults = SettingDefaults.from_config(job.generation, preset)
        check_job_settings(preset, steps=defaults.steps, guidance_scale=defaults.guidance_scale)
    line = line or JobLine(enabled=progress)
    results = {}
    for name, job in jobs.items():
        line.restart(name)
        results[name] = run_job(job, ray_address=ray_address, line=line)
    fs, root = filesystem(config.output, config.storage)
    results = {name: with_rendered_figures(fs, join(root, name), result) for name, result in results.items()}
    rows = {name: _metadata_rows(fs, join(root, name)) for name in presets}
    grids = _write_grids(fs, root, presets, rows, results)
    table = comparison_table(presets, results)
    stats = {"presets": {name: _preset_stats(name, result) for name, result in results.items()}, "grids": grids}
    write_bytes(fs, join(root, COMPARE_FILE), (table + "\n").encode())
    write_json(fs, join(root, STATS_FILE), stats)
    return CompareResult(output=config.output, grids=[join(config.output, g) for g in grids], table=table, stats=stats)


def with_rendered_figures(fs: AbstractFileSystem, output: str, result: JobResult) -> JobResult:
    """A preset with nothing left to render (a rerun of the comparison) keeps the figures of the
    run that rendered it: its `stats.json`, which a run that renders nothing leaves unchanged. The
    table then compares what was measured, not zeros."""
    if result.rows:
        return result
    previous = read_json(fs, join(output, STATS_FILE))
    return replace(result, stats=previous) if previous and previous.get("rows") else result


def _preset_stats(name: str, result: JobResult) -> dict[str, Any]:
    preset = get_preset(name)
    return {
        "rows": result.stats["rows"],
        "seconds_per_image": result.stats["seconds_per_image"],
        "images_per_second": result.stats["images_per_second"],
        "peak_memory_mb": result.stats["peak_memory_mb"],
        "scheduler": preset.scheduler_label(),
        "steps": preset.steps,
        "guidance_scale": preset.guidance_scale,
    }


def comparison_table(presets: list[str], results: dict[str, JobResult]) -> str:
    lines = [
        "| preset | images | seconds/image | images/s (job) | peak memory MB | steps | guidance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in presets:
        stats, preset = results[name].stats, get_preset(name)
        lines.append(
            f"| {name} | {stats['rows']} | {stats['seconds_per_image']:.3f} | {stats['images_per_second']:.2f} | "
            f"{stats['peak_memory_mb']:.0f} | {preset.steps} | {preset.guidance_scale:g} |"
        )
    return "\n".join(lines)


def _metadata_rows(fs: Any, prefix: str) -> list[dict[str, Any]]:
    table = pads.dataset(join(prefix, METADATA_DIR), format="parquet", filesystem=fs).to_table(
        columns=["id", "prompt", "seed", "image_path"]
    )
    return [{**row, "image_path": join(prefix, row["image_path"])} for row in table.to_pylist()]


def _write_grids(
    fs: Any, root: str, presets: list[str], rows: dict[str, list[dict[str, Any]]], results: dict[str, JobResult]
) -> list[str]:
    by_prompt: dict[str, dict[int, dict[str, str]]] = {}
    for name in presets:
        for row in sorted(rows[name], key=lambda r: r["id"]):
            by_prompt.setdefault(row["prompt"], {}).setdefault(row["seed"], {})[name] = row["image_path"]
    grids = []
    for index, (prompt, seeds) in enumerate(by_prompt.items()):
        labels = {name: f"{name}\n{results[name].stats['seconds_per_image']:.2f} s/image" for name in presets}
        grid = _grid(fs, prompt, presets, seeds, labels)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        relpath = f"{GRIDS_DIR}/prompt-{index:03d}.png"
        write_bytes(fs, join(root, relpath), buffer.getvalue())
        grids.append(relpath)
    return grids


def _grid(
    fs: Any, prompt: str, presets: list[str], seeds: dict[int, dict[str, str]], labels: dict[str, str]
) -> Image.Image:
    from PIL import Image, ImageDraw, ImageOps

    cell_height = TILE + LABEL_HEIGHT
    grid = Image.new("RGB", (TILE * len(presets), TITLE_HEIGHT + cell_height * len(seeds)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), prompt[:120], fill="black")
    for row, (seed, paths) in enumerate(sorted(seeds.items())):
        top = TITLE_HEIGHT + row * cell_height
        for column, name in enumerate(presets):
            left = column * TILE
            if name in paths:
                with fs.open(paths[name], "rb") as handle:
                    tile = ImageOps.contain(Image.open(handle).convert("RGB"), (TILE, TILE))
                grid.paste(tile, (left + (TILE - tile.width) // 2, top + (TILE - tile.height) // 2))
            draw.text((left + 4, top + TILE + 2), f"{labels[name]}  seed {seed}", fill="black")
    return grid

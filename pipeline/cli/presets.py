"""`models` lists the model presets; `compare` renders one manifest with several of them, side by side."""

from __future__ import annotations

import argparse

from pipeline.cli.common import add_job_arguments, load_job_config, ray_address


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `models` and `compare`."""
    models = commands.add_parser(
        "models", help="list the model presets", description="The model presets and what they pin."
    )
    models.set_defaults(handler=cmd_models)
    compare = commands.add_parser(
        "compare",
        help="render a manifest with several presets and write side-by-side grids",
        description="Every prompt x seed of the manifest rendered with each preset; one grid per prompt.",
    )
    compare.add_argument("--presets", required=True, help="comma-separated preset names, e.g. lightning-4step,turbo")
    add_job_arguments(compare)
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    compare.set_defaults(handler=cmd_compare)


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def cmd_models(args: argparse.Namespace) -> int:
    """Every preset in two lines of at most 100 columns: its settings, then its weights and licence."""
    from pipeline.models.presets import PRESETS

    header = ("preset", "steps", "guidance", "size", "scheduler")
    rows = [header]
    details = []
    for p in PRESETS.values():
        steps = (
            str(p.steps)
            if p.steps_range[0] == p.steps_range[1]
            else f"{p.steps} ({p.steps_range[0]}-{p.steps_range[1]})"
        )
        rows.append((p.name, steps, f"{p.guidance_scale:g}", f"{p.width}x{p.height}", _scheduler(p.scheduler_label())))
        weights = p.weights_label().replace(SDXL_BASE, "SDXL base")
        details.append(f"  {weights}; " + ("! " if "non-commercial" in p.licence.lower() else "") + p.licence)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if k:
            print(details[k - 1])
    print(f"\nSDXL base: {SDXL_BASE}")
    print("! non-commercial licence: check the terms before using its images commercially.")
    return 0


def _scheduler(label: str) -> str:
    """`EulerDiscreteScheduler(prediction_type=sample, timestep_spacing=trailing)` as `Euler (sample, trailing)`."""
    name, _, options = label.partition("(")
    name = name.removesuffix("Scheduler").removesuffix("Discrete") or name
    values = [option.split("=", 1)[-1] for option in options.rstrip(")").split(", ") if option]
    return f"{name} ({', '.join(values)})" if values else name


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.commands.compare import run_compare
    from pipeline.core.io import join
    from pipeline.core.layout import COMPARE_FILE, STATS_FILE
    from pipeline.run.progress import JobLine, console_above

    config = load_job_config(args)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    line = JobLine(enabled=not args.no_progress)
    with console_above(line, verbose=args.verbose):
        result = run_compare(config, presets, ray_address=ray_address(), line=line)
    print(result.table)
    print(f"\nGrids ({len(result.grids)}):")
    for grid in result.grids:
        print(f"  {grid}")
    print(f"Table: {join(result.output, COMPARE_FILE)}   stats: {join(result.output, STATS_FILE)}")
    return 0

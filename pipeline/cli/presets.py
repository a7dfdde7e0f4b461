"""`models` lists the model presets; `compare` renders one manifest with several of them, side by side."""

from __future__ import annotations

import argparse

from pipeline.cli.common import add_job_arguments, load_job_config, print_table, ray_address


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
    add_job_arguments(compare, config_required=False)
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    compare.set_defaults(handler=cmd_compare)


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models.presets import PRESETS

    header = ("preset", "weights", "scheduler", "steps", "guidance", "size", "licence")
    rows = [header] + [
        (
            p.name,
            p.weights_label(),
            p.scheduler_label(),
            str(p.steps)
            if p.steps_range[0] == p.steps_range[1]
            else f"{p.steps} ({p.steps_range[0]}-{p.steps_range[1]})",
            f"{p.guidance_scale:g}",
            f"{p.width}x{p.height}",
            ("! " if "non-commercial" in p.licence.lower() else "") + p.licence,
        )
        for p in PRESETS.values()
    ]
    print_table(rows)
    print("\n! non-commercial licence: check the terms before using its images commercially.")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.commands.compare import run_compare
    from pipeline.core.io import join
    from pipeline.core.layout import COMPARE_FILE, STATS_FILE

    config = load_job_config(args)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result = run_compare(config, presets, ray_address=ray_address(), progress=not args.no_progress)
    print(result.table)
    print(f"\nGrids ({len(result.grids)}):")
    for grid in result.grids:
        print(f"  {grid}")
    print(f"Table: {join(result.output, COMPARE_FILE)}   stats: {join(result.output, STATS_FILE)}")
    return 0

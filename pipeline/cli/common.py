"""What the command groups share: the arguments that name a job, loading its config, the cluster address.

Nothing here imports more than the standard library at module level: `sdxl-batch --help` builds every
parser, and must not pay for pydantic, Ray or torch.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig, StorageConfig


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file (optional) and its overrides, which `load_job_config` turns into one
    JobConfig: `sdxl-batch run --manifest M --output O` runs the defaults on M."""
    parser.add_argument(
        "config", nargs="?", help="YAML job config (see configs/demo.yaml; optional: the defaults and the flags below)"
    )
    parser.add_argument("--manifest", help="the manifest URI (overrides the config's)")
    parser.add_argument("--output", help="the output URI (overrides the config's)")
    parser.add_argument("--preset", help="the model preset, as --set model.preset=NAME (`sdxl-batch models`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set generation.batch_size=8 (repeatable)",
    )


def add_address(parser: argparse.ArgumentParser) -> None:
    """The Ray Jobs API's address; required unless the environment names one."""
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS"),
        required=not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS")),
        help="the head's dashboard address, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )


def load_job_config(args: argparse.Namespace) -> JobConfig:
    """The config of the arguments added by `add_job_arguments`."""
    from pipeline.core.config import load_config

    overrides = [*args.overrides, *([f"model.preset={args.preset}"] if args.preset else [])]
    return load_config(args.config, manifest=args.manifest, output=args.output, overrides=overrides)


def storage_config(args: argparse.Namespace) -> StorageConfig:
    """The storage options of `--config` for commands that read an output; the defaults without one."""
    from pipeline.core.config import StorageConfig, load_config

    if not args.config:
        return StorageConfig()
    return load_config(args.config, output=args.output, manifest="unused").storage


def ray_address() -> str | None:
    """The cluster that `run`, `compare`, `estimate` and `tune` join; None starts an embedded Ray."""
    return os.environ.get("RAY_ADDRESS") or None


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, the first row the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

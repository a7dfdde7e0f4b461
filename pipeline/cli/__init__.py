"""The `sdxl-batch` command line.

Each command group (render, presets, cluster, throughput) adds its own parsers, each parser naming its
handler; the handlers import the pipeline when they run, so `sdxl-batch --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from pipeline import __version__
from pipeline.cli import cluster, presets, render, throughput
from pipeline.core.errors import SdxlBatchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-batch", description="Distributed batch image generation with SDXL models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level, and print an error's whole chain of causes"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # In this order in `--help`: a job's life, then the presets, the cluster, and throughput.
    for group in (render, presets, cluster, throughput):
        group.add_parsers(commands)
    return parser


def _disconnect_ray() -> None:
    """Workers' console lines (a crashed process's dump) keep streaming to the driver after a job
    has failed; disconnecting first makes our error the last thing printed."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        # Arrow's scanner threads over fsspec filesystems (S3) can outlive a dataset and abort at
        # interpreter shutdown ("terminate called without an active exception", apache/arrow#45214,
        # seen once from `verify` on S3 after it printed OK): release them while Arrow is alive.
        gc.collect()
        return code
    except SdxlBatchError as error:
        _disconnect_ray()
        if args.verbose:  # the whole chain: what went wrong underneath (a storage, model or cluster error)
            traceback.print_exception(error, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: committed parts are kept; run the same command again to resume", file=sys.stderr)
        return 130

"""How fast and at what cost: `report` on a job that ran, `estimate` for one to come, `tune` for its settings."""

from __future__ import annotations

import argparse

from pipeline.cli.common import add_job_arguments, load_job_config, ray_address, storage_config


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `report`, `estimate` and `tune`."""
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of an output (throughput, stages, actors, sample images)",
        description="Writes OUTPUT/report.html from stats.json, the per-part stats records and the metadata.",
    )
    report.add_argument("output", help="output prefix of a job (local or s3://)")
    report.add_argument("--config", help="a job config, for its storage options")
    report.add_argument("--samples", type=int, default=24, help="images on the contact sheet (default 24)")
    report.set_defaults(handler=cmd_report)
    estimate = commands.add_parser(
        "estimate",
        help="time and cost of a job, from a tuning result or a short calibration run",
        description=(
            "Estimates the wall time, GPU-hours and cost of rendering the job's pending rows. The throughput comes "
            "from a tuning result (--from TUNE.json, written by `sdxl-batch tune`) with the same model and settings, "
            "or else from a calibration run that renders a sample of the manifest with the job's settings."
        ),
    )
    add_job_arguments(estimate)
    estimate.add_argument("--from", dest="tuning", metavar="TUNE_JSON", help="a tuning result to use")
    estimate.add_argument("--sample", type=int, default=None, help="rows in the calibration run (default: 4 batches)")
    estimate.add_argument("--gpu-hour-price", type=float, default=None, help="price per GPU-hour (or node-hour on CPU)")
    estimate.add_argument(
        "--work-dir", default=None, help="scratch folder of the calibration run (default: outputs/estimate/...)"
    )
    estimate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    estimate.set_defaults(handler=cmd_estimate)
    _add_tune(commands)


def _add_tune(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tune = commands.add_parser(
        "tune",
        help="sweep batch size, actors per GPU, precision and compilation on a sample; write the best config",
        description=(
            "Each trial renders the same sample of the manifest as a normal job. Prints images/s, seconds per "
            "image, peak memory and cost per 1,000 images for every trial, records trials that run out of memory, "
            "and writes the fastest as a config file."
        ),
    )
    add_job_arguments(tune)
    sweep = {
        "--batch-sizes": "batch sizes (default 1,2,4,8)",
        "--actors-per-gpu": "actors sharing one GPU (default 1,2 on GPU, 1 on CPU)",
        "--dtypes": "precisions: fp32, fp16, bf16 (default fp16,bf16 on GPU, fp32 on CPU)",
        "--compile": "torch.compile the UNet: off, on (default off,on on GPU, off on CPU)",
    }
    for flag, text in sweep.items():
        tune.add_argument(flag, default=None, help=f"comma-separated {text}")
    tune.add_argument("--sample", type=int, default=None, help="rows per trial (default: 4 x the largest batch)")
    tune.add_argument("--gpu-hour-price", type=float, default=None, help="price per GPU-hour (or node-hour on CPU)")
    tune.add_argument("--work-dir", default=None, help="trials and tune.json (default: outputs/tune/<config>)")
    tune.add_argument("--write", dest="best_config", default=None, help="best config path (default: in the work dir)")
    tune.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    tune.set_defaults(handler=cmd_tune)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.output.report import write_report

    path = write_report(args.output, storage=storage_config(args), samples=args.samples)
    print(f"Report: {path}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import run_estimate

    estimate = run_estimate(
        load_job_config(args),
        tuning=args.tuning,
        sample=args.sample,
        price=args.gpu_hour_price,
        work_dir=args.work_dir,
        ray_address=ray_address(),
        progress=not args.no_progress,
    )
    print("\n".join(estimate.lines()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import SweepSpace, prepare, run_tune

    config = prepare(load_job_config(args), ray_address())
    space = SweepSpace.parse(
        config, batch_sizes=args.batch_sizes, actors_per_gpu=args.actors_per_gpu, dtypes=args.dtypes,
        compile=args.compile,
    )  # fmt: skip
    result = run_tune(
        config,
        space,
        config_path=args.config,
        sample=args.sample,
        price=args.gpu_hour_price,
        work_dir=args.work_dir,
        best_config=args.best_config,
        ray_address=ray_address(),
        progress=not args.no_progress,
    )
    print(result.table())
    print("\n".join(result.closing_lines()))
    return 0 if result.best is not None else 1

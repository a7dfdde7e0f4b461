"""How fast and at what cost: `report` on a job that ran, `estimate` for one to come, `tune` for its settings."""

from __future__ import annotations

import argparse

from pipeline.cli.common import add_job_arguments, ray_address, storage_config

# The search space's flags: the tune parser's argument -> what it takes.
SPACE_FLAGS = {
    "--batch-sizes": "batch sizes (default 1,2,4,8,16 on GPUs, 1,2,4,8 on CPU)",
    "--actors-per-gpu": "actors sharing one GPU, each loading the model (default 1,2 on GPUs, 1 on CPU)",
    "--dtypes": "precisions: fp32, fp16, bf16 (default bf16,fp16 on GPUs, fp32 on CPU)",
    "--compile": "torch.compile the UNet: off, on (default off,on on GPUs, off on CPU)",
    "--attention": "attention kernels: sdpa, flash, eager (default sdpa,flash on GPUs, sdpa on CPU)",
    "--fuse-qkv": "fused q/k/v projections: off, on (default off,on on GPUs, off on CPU)",
    "--channels-last": "UNet in channels_last: off, on (default off,on on GPUs, off on CPU)",
    "--vae-batch-sizes": "VAE decode chunks, auto = about 4 megapixels (default auto)",
    "--encode-cpus": "CPUs per GPU for encoding, auto = what the node has (default auto; tried when encoding limits)",
}


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
    _add_estimate(commands)
    _add_tune(commands)


def _add_prices(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prices", default=None, metavar="TYPE=PRICE,...|FILE",
        help="price per GPU-hour per GPU type, e.g. A10G=1.01,H100=3.90, or a YAML file mapping types to prices",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-hour-price", type=float, default=None,
        help="one price per GPU-hour for every type (per machine-hour on CPU; default: resources.gpu_hour_price)",
    )  # fmt: skip


def _add_estimate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    estimate = commands.add_parser(
        "estimate",
        help="time and cost of a job on a fleet, from a tuning result or a short calibration run",
        description=(
            "Estimates the wall time, GPU-hours and cost of rendering the job's pending rows. The rates come from "
            "a tuning result (--from TUNE.json, written by `sdxl-batch tune`: each GPU type at its tuned settings) "
            "or else from a calibration run that renders a sample of the manifest with the job's settings. "
            "--deadline picks the cheapest mix of the available GPUs that meets it; --budget the fastest within it."
        ),
    )
    add_job_arguments(estimate)
    estimate.add_argument("--from", dest="tuning", metavar="TUNE_JSON", help="a tuning result to use")
    estimate.add_argument(
        "--fleet", default=None, metavar="TYPE=N,...",
        help="GPUs per type to run on (or to choose from, with --deadline/--budget); default: those the tuning used",
    )  # fmt: skip
    _add_prices(estimate)
    goal = estimate.add_mutually_exclusive_group()
    goal.add_argument("--deadline", default=None, help="the cheapest mix that finishes within this time (e.g. 6h, 90m)")
    goal.add_argument("--budget", type=float, default=None, help="the fastest mix that costs at most this much")
    estimate.add_argument("--sample", type=int, default=None, help="rows in the calibration run (default: 4 batches)")
    estimate.add_argument(
        "--work-dir", default=None, help="scratch folder of the calibration run (default: outputs/estimate/...)"
    )
    estimate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    estimate.set_defaults(handler=cmd_estimate)


def _add_tune(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tune = commands.add_parser(
        "tune",
        help="find the fastest settings per GPU type, on every GPU of the cluster at once; write a fleet config",
        description=(
            "On a cluster (RAY_ADDRESS or --address), runs up to one trial per GPU at once on Ray Tune, each pinned "
            "to a GPU type with the CPUs such a GPU gets in a job: a trial loads the model once with one setting of "
            "what is loaded (precision, compile, attention, fused q/k/v, channels_last, actors per GPU) and measures "
            "the job's own stages on a sample of the manifest at each batch setting (batch size, VAE chunk, encode "
            "CPUs), after a memory probe. Settings that change pixels must pass a quality gate against the "
            "reference (float32 or bfloat16, eager). Prints a table per type, writes tune.json, tune.html and a "
            "config whose fleet: section runs every type at its best. On one machine, trials run one after another."
        ),
    )
    add_job_arguments(tune)
    for flag, text in SPACE_FLAGS.items():
        tune.add_argument(flag, default=None, help=f"comma-separated {text}")
    tune.add_argument(
        "--max-concurrent", type=int, default=None,
        help="trials at once (default: one per GPU of the tuned types; 1 runs them one after another)",
    )  # fmt: skip
    tune.add_argument("--search", choices=("quick", "grid"), default="quick",
                      help="quick: a hill-climb that stops after 4 steps in a row gain under 5%% (default); "
                           "grid: every combination")  # fmt: skip
    tune.add_argument("--types", default=None, help="comma-separated GPU types to tune (default: every type)")
    tune.add_argument("--address", default=None, help="the cluster's address (default: RAY_ADDRESS, else this machine)")
    tune.add_argument(
        "--max-memory-fraction", type=float, default=None,
        help="settings whose peak GPU memory exceeds this share of the GPU are infeasible (e.g. 0.9)",
    )  # fmt: skip
    tune.add_argument(
        "--min-images-per-second", type=float, default=None, help="settings slower than this (per GPU) are not chosen"
    )
    tune.add_argument(
        "--quality", default=None, metavar="METRIC[:THRESHOLD]",
        help="the quality gate: psnr[:dB] (default psnr:20) or mad[:levels] (mean absolute difference)",
    )  # fmt: skip
    tune.add_argument(
        "--reference", default=None,
        help="the gate's reference precision: fp32 or bf16 (default: bf16 where the GPU has it, else fp32)",
    )  # fmt: skip
    _add_prices(tune)
    tune.add_argument("--sample", type=int, default=None, help="rows per measurement (default: 5 x the largest batch)")
    tune.add_argument("--work-dir", default=None, help="tune.json, tune.html (default: outputs/tune/<config>)")
    tune.add_argument("--write", dest="best_config", default=None, help="best config path (default: in the work dir)")
    tune.add_argument("--cache-dir", default=None, help="measured loads (default: ~/.cache/sdxl-batch/tune)")
    tune.add_argument("--fresh", action="store_true", help="measure everything again (ignore the cache)")
    tune.add_argument("--no-progress", action="store_true", help="hide the progress line")
    tune.set_defaults(handler=cmd_tune)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.output.report import write_report
    from pipeline.run.runner import output_executor

    address = ray_address()
    # Ray tasks only on a cluster: on one machine the report's reads (footers, small records) gain
    # nothing from them, and an embedded Ray costs its start and ~100 MiB (verify_scale.md).
    path = write_report(
        args.output,
        storage=storage_config(args),
        samples=args.samples,
        executor=(lambda parts: output_executor(parts, address)) if address else None,
    )
    print(f"Report: {path}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from pipeline.cli.common import load_job_config
    from pipeline.commands.tuning.cost import parse_prices
    from pipeline.commands.tuning.estimate import EstimateRequest, run_estimate

    config = load_job_config(args)
    request = EstimateRequest(
        tuning=args.tuning,
        fleet=args.fleet,
        prices=parse_prices(args.prices),
        default_price=args.gpu_hour_price if args.gpu_hour_price is not None else config.resources.gpu_hour_price,
        deadline=args.deadline,
        budget=args.budget,
        sample=args.sample,
        work_dir=args.work_dir,
        progress=not args.no_progress,
    )
    result = run_estimate(config, request, ray_address=ray_address())
    print("\n".join(result.lines()))
    return 0 if result.plan is not None or result.nothing_pending else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.cli.common import load_job_config
    from pipeline.commands.tuning.cost import parse_prices
    from pipeline.commands.tuning.outputs import closing_lines, type_table, write_outputs
    from pipeline.commands.tuning.quality import QualityGate
    from pipeline.commands.tuning.tune import TuneOptions, default_work, run_tune

    config = load_job_config(args)
    flags = {
        flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_")) for flag in SPACE_FLAGS
    }
    flags["reference"] = args.reference
    options = TuneOptions(
        work_dir=Path(args.work_dir) if args.work_dir else default_work("tune", args.config),
        search=args.search,
        types=[t.strip() for t in args.types.split(",") if t.strip()] if args.types else None,
        sample=args.sample,
        prices=parse_prices(args.prices),
        default_price=args.gpu_hour_price if args.gpu_hour_price is not None else config.resources.gpu_hour_price,
        best_config=Path(args.best_config) if args.best_config else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        fresh=args.fresh,
        max_concurrent=args.max_concurrent,
        max_memory_fraction=args.max_memory_fraction,
        min_images_per_second=args.min_images_per_second,
        gate=QualityGate.parse(args.quality),
        progress=not args.no_progress,
        config_path=args.config,
    )
    run = run_tune(config, flags, options, ray_address=args.address or ray_address())
    record, best = write_outputs(run)
    for name in run.types:
        print(type_table(run, name) + "\n")
    print("\n".join(closing_lines(run, record, best)))
    return 0 if best is not None else 1

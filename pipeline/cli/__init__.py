"""The `sdxl-batch` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from pipeline import __version__
from pipeline.core.errors import SdxlBatchError


def _add_job_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    if config_required:
        parser.add_argument("config", help="YAML job config (see configs/demo.yaml)")
    else:
        parser.add_argument("config", nargs="?", help="YAML job config (optional: defaults plus the flags)")
    parser.add_argument("--manifest", help="override the config's manifest URI")
    parser.add_argument("--output", help="override the config's output URI")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set generation.batch_size=8 (repeatable)",
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS"),
        required=not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS")),
        help="the head's dashboard address, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-batch", description="Distributed batch image generation with SDXL models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="render a manifest (embedded local Ray, or the cluster named by RAY_ADDRESS)",
        description="Render every row of a manifest into the output prefix.",
    )
    _add_job_arguments(run)
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the embedded Ray's Prometheus metrics on this port (clusters: ray start --metrics-export-port)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the output's previous results first (default: resume, skipping rows already done)",
    )
    validate = commands.add_parser(
        "validate",
        help="check a job's config and manifest, and show what it will do, without starting it",
        description=(
            "The checks `run` makes before any GPU work: config, preset limits, every manifest row, the output's "
            "state. Exit status 0: the job can start; 1: bad rows would stop it (on_bad_row: fail); 2: a "
            "structural problem (unreadable manifest, missing column, unknown key, bad credentials...)."
        ),
    )
    _add_job_arguments(validate)
    validate.add_argument(
        "--overwrite", action="store_true", help="plan as `run --overwrite` would (ignore the output's results)"
    )
    verify = commands.add_parser(
        "verify",
        help="check an output: every row exactly once, images present with matching sha256",
        description="Exit status 0 when the output is complete and consistent, 1 when it is not.",
    )
    verify.add_argument("output", help="output prefix to check (local or s3://)")
    verify.add_argument("--manifest", help="also check that exactly the manifest's ids are present")
    verify.add_argument("--config", help="a job config, for its storage options")
    commands.add_parser("models", help="list the model presets", description="The model presets and what they pin.")
    compare = commands.add_parser(
        "compare",
        help="render a manifest with several presets and write side-by-side grids",
        description="Every prompt x seed of the manifest rendered with each preset; one grid per prompt.",
    )
    compare.add_argument("--presets", required=True, help="comma-separated preset names, e.g. lightning-4step,turbo")
    _add_job_arguments(compare, config_required=False)
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    submit = commands.add_parser(
        "submit",
        help="validate a job, then submit it to a Ray cluster through the Ray Jobs API",
        description=(
            "Runs the checks of `validate` here, then ships pipeline/, jobs/, configs/ and the config (without "
            "storage credentials: the cluster uses its own) as the job's working directory, and runs "
            "`python jobs/generate.py CONFIG ...` on the cluster. Token auth: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token."
        ),
    )
    _add_job_arguments(submit)
    _add_address(submit)
    submit.add_argument(
        "--wait", action="store_true", help="stream the job's logs until it ends; exit 1 unless it succeeded"
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="environment variable for the job's processes (repeatable; visible in the job's info: no secrets)",
    )  # fmt: skip
    submit.add_argument(
        "--skip-validation", action="store_true", help="submit without the local checks (manifest only on the cluster)"
    )
    jobs = commands.add_parser(
        "jobs", help="list, inspect, follow and stop submitted jobs", description="Ray Jobs API."
    )
    actions = jobs.add_subparsers(dest="action", required=True)
    _add_address(actions.add_parser("list", help="jobs on the cluster, oldest first"))
    for action, text in (("status", "a job's status and details"), ("stop", "stop a running job")):
        parser_ = actions.add_parser(action, help=text)
        parser_.add_argument("job_id")
        _add_address(parser_)
    logs = actions.add_parser("logs", help="a job's logs (its driver's output)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    _add_address(logs)
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of an output (throughput, stages, actors, sample images)",
        description="Writes OUTPUT/report.html from stats.json, the per-part stats records and the metadata.",
    )
    report.add_argument("output", help="output prefix of a job (local or s3://)")
    report.add_argument("--config", help="a job config, for its storage options")
    report.add_argument("--samples", type=int, default=24, help="images on the contact sheet (default 24)")
    estimate = commands.add_parser(
        "estimate",
        help="time and cost of a job, from a tuning result or a short calibration run",
        description=(
            "Estimates the wall time, GPU-hours and cost of rendering the job's pending rows. The throughput comes "
            "from a tuning result (--from TUNE.json, written by `sdxl-batch tune`) with the same model and settings, "
            "or else from a calibration run that renders a sample of the manifest with the job's settings."
        ),
    )
    _add_job_arguments(estimate)
    estimate.add_argument("--from", dest="tuning", metavar="TUNE_JSON", help="a tuning result to use")
    estimate.add_argument("--sample", type=int, default=None, help="rows in the calibration run (default: 4 batches)")
    estimate.add_argument("--gpu-hour-price", type=float, default=None, help="price per GPU-hour (or node-hour on CPU)")
    estimate.add_argument(
        "--work-dir", default=None, help="scratch folder of the calibration run (default: outputs/estimate/...)"
    )
    estimate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tune = commands.add_parser(
        "tune",
        help="sweep batch size, actors per GPU, precision and compilation on a sample; write the best config",
        description=(
            "Each trial renders the same sample of the manifest as a normal job. Prints images/s, seconds per "
            "image, peak memory and cost per 1,000 images for every trial, records trials that run out of memory, "
            "and writes the fastest as a config file."
        ),
    )
    _add_job_arguments(tune)
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
    return parser


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pipeline.core.config import load_config

    return load_config(args.config, manifest=args.manifest, output=args.output, overrides=args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run.runner import run_job

    config = _load(args)
    result = run_job(
        config,
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        metrics_port=args.metrics_port,
    )
    rejected = result.stats["rows_rejected"]
    if rejected:
        print(f"Skipped {rejected} bad rows (on_bad_row: skip): see {result.output.rstrip('/')}/rejects/")
    done_before = result.stats["rows_done_before"]
    if done_before:
        print(f"Resumed: {done_before} of {result.stats['manifest_rows']} rows were already done and were skipped")
    print(f"Rendered {result.rows} images in {result.wall_seconds:.1f} s ({result.images_per_second:.2f} images/s)")
    for name, location in result.locations().items():
        print(f"  {name:<9}{location}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.plan.job import SHOWN_PROBLEMS, plan_job

    job = plan_job(_load(args), overwrite=args.overwrite)
    print("\n".join(job.summary_lines()))
    manifest = job.manifest
    if manifest.problem_count:
        shown = min(SHOWN_PROBLEMS, manifest.problem_count)
        print(f"\nbad rows (first {shown}; row numbers count from 0 in each file):")
        for line in manifest.problem_lines(SHOWN_PROBLEMS):
            print(f"  {line}")
        if job.config.on_bad_row == "fail":
            print("\nNOT READY: fix these rows, or set on_bad_row: skip to render the others (listed in rejects/)")
            return 1
    print("\nOK: the job can start")
    return 0


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print("\n! non-commercial licence: check the terms before using its images commercially.")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.commands.compare import run_compare
    from pipeline.core.io import join
    from pipeline.core.layout import COMPARE_FILE, STATS_FILE

    config = _load(args)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result = run_compare(
        config, presets, ray_address=os.environ.get("RAY_ADDRESS") or None, progress=not args.no_progress
    )
    print(result.table)
    print(f"\nGrids ({len(result.grids)}):")
    for grid in result.grids:
        print(f"  {grid}")
    print(f"Table: {join(result.output, COMPARE_FILE)}   stats: {join(result.output, STATS_FILE)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.core.config import StorageConfig, load_config
    from pipeline.output.verify import verify_output

    storage = (
        load_config(args.config, output=args.output, manifest="unused").storage if args.config else StorageConfig()
    )
    report = verify_output(args.output, manifest=args.manifest, storage=storage)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.core.config import StorageConfig, load_config
    from pipeline.output.report import write_report

    storage = (
        load_config(args.config, output=args.output, manifest="unused").storage if args.config else StorageConfig()
    )
    path = write_report(args.output, storage=storage, samples=args.samples)
    print(f"Report: {path}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import run_estimate

    estimate = run_estimate(
        _load(args),
        tuning=args.tuning,
        sample=args.sample,
        price=args.gpu_hour_price,
        work_dir=args.work_dir,
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        progress=not args.no_progress,
    )
    print("\n".join(estimate.lines()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import SweepSpace, prepare, run_tune

    config = prepare(_load(args), os.environ.get("RAY_ADDRESS") or None)
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
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        progress=not args.no_progress,
    )
    print(result.table())
    print("\n".join(result.closing_lines()))
    return 0 if result.best is not None else 1


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    from pipeline.core.errors import ConfigError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.commands import submit

    config = _load(args)
    job = submit.submit(
        config, config_path=args.config, address=args.address, manifest=args.manifest, output=args.output,
        overrides=args.overrides, env=_env_pairs(args.env), validate=not args.skip_validation,
    )  # fmt: skip
    print(f"Submitted {job.job_id} to {job.address}")
    print(f"  status  sdxl-batch jobs status {job.job_id} --address {job.address}")
    print(f"  logs    sdxl-batch jobs logs {job.job_id} --follow --address {job.address}")
    if not args.wait:
        return 0
    status = submit.follow_logs(args.address, job.job_id, lambda text: print(text, end="", flush=True))
    print(f"\n{job.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.commands import submit

    if args.action == "list":
        found = submit.list_jobs(args.address)
        rows = [("job", "status", "started", "entrypoint")]
        for job in found:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.start_time / 1000)) if job.start_time else "-"
            rows.append((job.submission_id or job.job_id or "-", str(job.status), started, job.entrypoint[:70]))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return 0
    if args.action == "status":
        print("\n".join(submit.describe(submit.job_info(args.address, args.job_id))))
        return 0
    if args.action == "logs":
        if args.follow:
            status = submit.follow_logs(args.address, args.job_id, lambda text: print(text, end="", flush=True))
            print(f"\n{args.job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        print(submit.job_logs(args.address, args.job_id), end="")
        return 0
    stopped = submit.stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "models": cmd_models,
    "compare": cmd_compare,
    "verify": cmd_verify,
    "report": cmd_report,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "estimate": cmd_estimate,
    "tune": cmd_tune,
}


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
    try:
        return COMMANDS[args.command](args)
    except SdxlBatchError as error:
        _disconnect_ray()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed parts are kept; run the same command again to resume", file=sys.stderr)
        return 130

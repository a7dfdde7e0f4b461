"""`run` renders a manifest; `validate` checks a job before it starts, `verify` an output after it ends."""

from __future__ import annotations

import argparse

from pipeline.cli.common import add_job_arguments, load_job_config, ray_address, storage_config
from pipeline.output.stats import summary_lines


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `run`, `validate` and `verify`."""
    run = commands.add_parser(
        "run",
        help="render a manifest (embedded local Ray, or the cluster named by RAY_ADDRESS)",
        description="Render every row of a manifest into the output prefix.",
    )
    add_job_arguments(run)
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
    _add_takeover(run)
    run.set_defaults(handler=cmd_run)
    validate = commands.add_parser(
        "validate",
        help="check a job's config and manifest, and show what it will do, without starting it",
        description=(
            "The checks `run` makes before any GPU work: config, preset limits, every manifest row, the output's "
            "state. Exit status 0: the job can start; 1: bad rows would stop it (on_bad_row: fail); 2: a "
            "structural problem (unreadable manifest, missing column, unknown key, bad credentials...)."
        ),
    )
    add_job_arguments(validate)
    validate.add_argument(
        "--overwrite", action="store_true", help="plan as `run --overwrite` would (ignore the output's results)"
    )
    validate.set_defaults(handler=cmd_validate)
    verify = commands.add_parser(
        "verify",
        help="check an output: every row exactly once, images present with matching sha256",
        description=(
            "Exit status 0 when the output is complete and consistent, 1 when it is not. A large output (or any, "
            "with RAY_ADDRESS set) is checked by Ray tasks where the data is: on the cluster, or an embedded Ray."
        ),
    )
    verify.add_argument("output", help="output prefix to check (local or s3://)")
    verify.add_argument("--manifest", help="also check that exactly the manifest's ids are present")
    verify.add_argument("--config", help="a job config, for its storage options")
    verify.add_argument(
        "--clean",
        action="store_true",
        help="remove the objects of interrupted parts (tars, images, stats records, temporary files that no "
        "committed part lists); never while a job writes into the output. Every job's end does the same.",
    )
    verify.add_argument(
        "--sample",
        type=_fraction,
        default=1.0,
        metavar="FRACTION",
        help="check the sha256 of a random FRACTION of the images (e.g. 0.01); every image's presence and size "
        "are checked whatever it is (default: 1, every sha256)",
    )
    _add_takeover(verify, note=" (with --clean)")
    verify.set_defaults(handler=cmd_verify)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]: e.g. 0.01 checks 1% of the hashes")
    return value


def _add_takeover(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument(
        "--takeover",
        action="store_true",
        help=f"take the output's writer lease{note} from another job even if it may be alive: only when you know "
        "it is dead (a writer that died is taken over without this flag once its lease is stale)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run.progress import JobLine, console_above
    from pipeline.run.runner import run_job

    config = load_job_config(args)
    line = JobLine(enabled=not args.no_progress)
    with console_above(line, verbose=args.verbose):
        result = run_job(
            config,
            ray_address=ray_address(),
            overwrite=args.overwrite,
            metrics_port=args.metrics_port,
            takeover=args.takeover,
            line=line,
        )
    rejected = result.stats["rows_rejected"]
    if rejected:
        print(f"Skipped {rejected} bad rows (on_bad_row: skip): see {result.output.rstrip('/')}/rejects/")
    done_before = result.stats["rows_done_before"]
    if done_before:
        print(f"Resumed: {done_before} of {result.stats['manifest_rows']} rows were already done and were skipped")
    if result.rows:
        for text in summary_lines(result.stats):
            print(text)
    else:
        print("Rendered 0 images: every row was already done; the output and its statistics are unchanged")
    for name, location in result.locations().items():
        print(f"  {name:<9}{location}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.core.io import filesystem
    from pipeline.output.lease import describe_writer
    from pipeline.plan.job import SHOWN_PROBLEMS, check_job, plan_job
    from pipeline.run.runner import planning_executor

    config = load_job_config(args)
    check_job(config)
    job = plan_job(config, overwrite=args.overwrite, executor=planning_executor(config, ray_address()))
    print("\n".join(job.summary_lines()))
    writer = describe_writer(*filesystem(config.output, config.storage))
    if writer:  # `run` would be refused now (or would take a stale lease over)
        print(f"note       {writer}")
    manifest = job.manifest
    if manifest.problem_count:
        shown = min(SHOWN_PROBLEMS, manifest.problem_count)
        print(f"\nbad rows (first {shown}; row numbers count from 0 in each file):")
        for line in manifest.problem_lines(SHOWN_PROBLEMS):
            print(f"  {line}")
        if job.config.on_bad_row == "fail":
            print("\nNOT READY: fix these rows, or set on_bad_row: skip to render the others (listed in rejects/)")
            return 1
    if not job.pending_rows:
        print("\nOK: nothing to render: every good row of the manifest is already in the output")
        return 0
    print("\nOK: the job can start")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.output.verify import verify_output
    from pipeline.run.runner import output_executor

    address = ray_address()
    report = verify_output(
        args.output,
        manifest=args.manifest,
        storage=storage_config(args),
        clean=args.clean,
        takeover=args.takeover,
        sample=args.sample,
        executor=lambda parts: output_executor(parts, address),
    )
    print(report.summary())
    return 0 if report.ok else 1

"""`submit` sends a job to a Ray cluster through the Ray Jobs API; `jobs` lists, inspects, follows and stops them."""

from __future__ import annotations

import argparse
import time

from pipeline.cli.common import add_address, add_job_arguments, load_job_config, print_table


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `submit` and `jobs` with its actions."""
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
    add_job_arguments(submit)
    add_address(submit)
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
    submit.set_defaults(handler=cmd_submit)
    _add_jobs(commands)


def _add_jobs(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = commands.add_parser(
        "jobs", help="list, inspect, follow and stop submitted jobs", description="Ray Jobs API."
    )
    actions = jobs.add_subparsers(dest="action", required=True)
    list_ = actions.add_parser("list", help="jobs on the cluster, oldest first")
    add_address(list_)
    list_.set_defaults(handler=cmd_jobs_list)
    for action, text, handler in (
        ("status", "a job's status and details", cmd_jobs_status),
        ("stop", "stop a running job", cmd_jobs_stop),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("job_id")
        add_address(parser)
        parser.set_defaults(handler=handler)
    logs = actions.add_parser("logs", help="a job's logs (its driver's output)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    add_address(logs)
    logs.set_defaults(handler=cmd_jobs_logs)


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    from pipeline.core.errors import ConfigError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def _follow(address: str, job_id: str) -> int:
    """Stream a job's logs until it ends; exit status 0 only if it succeeded."""
    from pipeline.commands.submit import follow_logs

    status = follow_logs(address, job_id, lambda text: print(text, end="", flush=True))
    print(f"\n{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.commands import submit

    config = load_job_config(args)
    job = submit.submit(
        config, config_path=args.config, address=args.address, manifest=args.manifest, output=args.output,
        overrides=args.overrides, env=_env_pairs(args.env), validate=not args.skip_validation,
    )  # fmt: skip
    print(f"Submitted {job.job_id} to {job.address}")
    print(f"  status  sdxl-batch jobs status {job.job_id} --address {job.address}")
    print(f"  logs    sdxl-batch jobs logs {job.job_id} --follow --address {job.address}")
    if not args.wait:
        return 0
    return _follow(args.address, job.job_id)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from pipeline.commands.submit import list_jobs

    rows = [("job", "status", "started", "entrypoint")]
    for job in list_jobs(args.address):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        rows.append((job.submission_id or job.job_id or "-", str(job.status), started, job.entrypoint[:70]))
    print_table(rows)
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from pipeline.commands.submit import describe, job_info

    print("\n".join(describe(job_info(args.address, args.job_id))))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from pipeline.commands.submit import job_logs

    if args.follow:
        return _follow(args.address, args.job_id)
    print(job_logs(args.address, args.job_id), end="")
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from pipeline.commands.submit import stop_job

    stopped = stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0

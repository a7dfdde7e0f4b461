"""Remote submission through the Ray Jobs API (`JobSubmissionClient`, the head's dashboard port).

`submit` validates the job locally first (the checks `run` makes; a manifest of more than
`runner.LOCAL_PLANNING_BYTES` has its rows checked by the job itself, on the cluster, where its
planning tasks run beside the data), then ships `pipeline/`,
`jobs/`, `configs/` and the job's config file as the job's working directory; on the cluster,
`python jobs/generate.py CONFIG ...` runs `sdxl-batch run` as the job's driver, which joins the
cluster (Ray sets RAY_ADDRESS for it).

Authentication: with Ray's token auth (`RAY_AUTH_MODE=token`), the client sends the cluster's
token from `RAY_AUTH_TOKEN`, the file in `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

import pipeline
from pipeline import __version__
from pipeline.core.errors import ClusterError, ConfigError, SdxlBatchError
from pipeline.core.io import is_remote
from pipeline.output.stats import job_label
from pipeline.run.session import QUIET_ENV

if TYPE_CHECKING:
    from pipeline.core.config import JobConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The checkout that holds the package (found from the package itself, wherever this module sits).
REPO = Path(pipeline.__file__).resolve().parents[1]
SHIPPED = ("pipeline", "jobs", "configs")
SUBMITTED_CONFIG = "submitted.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How long `submit` waits for a head that is still starting (its dashboard not yet listening, or its
# job agent not yet up: Ray answers "No available agent to submit job, please try again later").
STARTING_WAIT_SECONDS = 90.0


def client(address: str) -> Any:
    """A JobSubmissionClient for the head's dashboard address (http://HEAD:8265)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:
        raise _cluster_error(error, address) from error


def client_or_raise(address: str) -> Any:
    """A JobSubmissionClient, letting the Ray client's own errors through (`retry_while_starting`)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _still_starting(error: BaseException) -> str | None:
    """What a head that is still starting answered, or None for any other error."""
    text = str(error)
    if "No available agent" in text:
        return "its job agent is not up yet"
    if isinstance(error, ConnectionError) and ("refused" in text.lower() or "Failed to connect" in text):
        return "its dashboard does not answer yet"
    return None


def retry_while_starting(address: str, action: Callable[[], T], *, wait_seconds: float = STARTING_WAIT_SECONDS) -> T:
    """Run `action` against the head, retrying with backoff (1, 2, 4, 8 s...) while the head is
    still starting, for `wait_seconds` at most, each retry said on stderr; other errors at once."""
    deadline = time.monotonic() + wait_seconds
    delay = 1.0
    while True:
        try:
            return action()
        except SdxlBatchError:
            raise
        except Exception as error:
            reason = _still_starting(error)
            left = deadline - time.monotonic()
            if reason is None:
                raise _cluster_error(error, address) from error
            if left <= 0:
                raise ClusterError(
                    f"the Ray head at {address} was still starting after {wait_seconds:.0f} s ({reason}: "
                    f"{str(error).splitlines()[0]}). Check `ray status` on the head and its dashboard log "
                    "(/tmp/ray/session_latest/logs/dashboard*.log), then submit again."
                ) from error
            pause = min(delay, left)
            print(f"the Ray head at {address} is still starting ({reason}); retrying in {pause:.0f} s", file=sys.stderr)
            time.sleep(pause)
            delay = min(delay * 2, 16.0)


def _cluster_error(error: BaseException, address: str) -> ClusterError:
    text = str(error).split("\n")[0]
    if type(error).__name__ == "AuthenticationError" or "authentication" in text.lower():
        return ClusterError(
            f"the Ray cluster at {address} refused the authentication token ({text}). Give the cluster's token in "
            "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token); on the head it "
            "is in ~/.ray/auth_token"
        )
    if isinstance(error, ConnectionError) or "connect" in text.lower():
        return ClusterError(
            f"cannot reach the Ray dashboard at {address}: {text}. Check the address (http://HEAD:8265), that the "
            "head runs with the dashboard (ray[default]; `ray start --head --dashboard-host=0.0.0.0`), and that the "
            "port is reachable (e.g. `kubectl port-forward svc/<cluster>-head-svc 8265:8265`)"
        )
    return ClusterError(f"the Ray Jobs API at {address} answered: {type(error).__name__}: {text}")


@contextmanager
def _calling(address: str) -> Iterator[None]:
    try:
        yield
    except SdxlBatchError:
        raise
    except Exception as error:
        raise _cluster_error(error, address) from error


def check_paths(config: JobConfig) -> None:
    """The job runs on the cluster, in a temporary working directory: a relative local path
    would point inside it. Object-store URIs or absolute paths on a shared filesystem work."""
    for name, uri in (("manifest", config.manifest), ("output", config.output)):
        if not is_remote(uri) and not uri.startswith(("/", "file://")):
            raise ConfigError(
                f"{name} {uri!r} is a relative local path, which would point inside the submitted job's temporary "
                "working directory on the cluster: use an s3:// URI or an absolute path that every node sees"
            )


def shipped_config(config_path: str | Path | None) -> str:
    """The user's config file as YAML without storage credentials: the working directory is
    stored in the cluster's object store, so the cluster uses its own credentials (instance
    role, service account, or AWS_* variables on the nodes)."""
    data: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    storage = data.get("storage")
    if isinstance(storage, dict):
        for key in ("key", "secret"):
            storage.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


def entrypoint(
    *, manifest: str | None, output: str | None, overrides: list[str], config_file: str = SUBMITTED_CONFIG
) -> str:
    args = ["python", "jobs/generate.py", config_file]
    if manifest:
        args += ["--manifest", manifest]
    if output:
        args += ["--output", output]
    for override in overrides:
        if override.split("=", 1)[0].strip() in {"storage.key", "storage.secret"}:
            raise ConfigError(
                "--set storage.key / storage.secret are not sent to the cluster (they would be visible in the job's "
                "entrypoint): give the cluster its own credentials"
            )
        args += ["--set", override]
    return shlex.join(args)


@contextmanager
def working_dir(config_path: str | Path | None) -> Iterator[Path]:
    """A staging folder with the code and configs the job needs, and the job's config."""
    with tempfile.TemporaryDirectory(prefix="sdxl-batch-submit-") as folder:
        root = Path(folder)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
        for name in SHIPPED:
            shutil.copytree(REPO / name, root / name, ignore=ignore)
        (root / SUBMITTED_CONFIG).write_text(shipped_config(config_path), encoding="utf-8")
        yield root


@dataclass(frozen=True)
class Submission:
    job_id: str
    address: str
    entrypoint: str


def submit(
    config: JobConfig,
    *,
    config_path: str | None,
    address: str,
    manifest: str | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    validate: bool = True,
) -> Submission:
    """Validate the job, then submit it to the cluster's Jobs API; returns its submission id."""
    from pipeline.plan.job import check_job, plan_job, raise_for_bad_rows
    from pipeline.plan.manifest import list_manifest_files
    from pipeline.run.runner import LOCAL_PLANNING_BYTES

    check_paths(config)
    if validate:
        check_job(config)
        _, _, _, sizes = list_manifest_files(
            config.manifest, config.storage, sizes=True, manifest_format=config.manifest_format
        )
        if sum(sizes) <= LOCAL_PLANNING_BYTES:
            raise_for_bad_rows(plan_job(config))
        else:  # planned where the data is: by the job's own driver, on the cluster, before any GPU work
            logger.info(
                "the manifest holds %.0f MiB of Parquet: its rows are checked on the cluster, as the job starts",
                sum(sizes) / 2**20,
            )
    command = entrypoint(manifest=manifest, output=output, overrides=overrides or [])
    job_id = f"sdxl-batch-{_slug(job_label(config.output))}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with working_dir(config_path) as folder:
        retry_while_starting(
            address,
            lambda: client_or_raise(address).submit_job(
                entrypoint=command,
                submission_id=job_id,
                runtime_env={"working_dir": str(folder), "env_vars": {**QUIET_ENV, **(env or {})}},
                metadata={"sdxl_batch": __version__, "output": config.output, "model": config.model.preset},
            ),
        )
    return Submission(job_id=job_id, address=address, entrypoint=command)


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:40].strip("-")
    return slug or "job"


def list_jobs(address: str) -> list[Any]:
    jobs = client(address)
    with _calling(address):
        found = jobs.list_jobs()
    return sorted(found, key=lambda job: job.start_time or 0)


def job_info(address: str, job_id: str) -> Any:
    jobs = client(address)
    with _calling(address):
        try:
            return jobs.get_job_info(job_id)
        except RuntimeError as error:
            if "does not exist" in str(error) or "404" in str(error):
                raise ClusterError(
                    f"no job {job_id!r} on the cluster at {address} (see `sdxl-batch jobs list`)"
                ) from None
            raise


def job_logs(address: str, job_id: str) -> str:
    job_info(address, job_id)
    jobs = client(address)
    with _calling(address):
        logs: str = jobs.get_job_logs(job_id)
    return logs


def follow_logs(address: str, job_id: str, write: Any) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    job_info(address, job_id)
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)

    with _calling(address):
        asyncio.run(tail())
        return str(job_info(address, job_id).status)


def wait_for(address: str, job_id: str, *, timeout: float | None = None, poll: float = 2.0) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(job_info(address, job_id).status)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll)


def stop_job(address: str, job_id: str) -> bool:
    job_info(address, job_id)
    jobs = client(address)
    with _calling(address):
        stopped: bool = jobs.stop_job(job_id)
    return stopped


def describe(job: Any) -> list[str]:
    """`jobs status` lines for a JobDetails/JobInfo."""

    def when(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    lines = [
        f"job        {job.submission_id or job.job_id}",
        f"status     {job.status}",
        f"started    {when(job.start_time)}",
        f"ended      {when(job.end_time)}",
        f"entrypoint {job.entrypoint}",
    ]
    if job.message:
        lines.append(f"message    {job.message}")
    for key, value in sorted((job.metadata or {}).items()):
        lines.append(f"{key:<10} {value}")
    return lines

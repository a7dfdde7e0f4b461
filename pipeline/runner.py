"""Running a job from the driver: plan the manifest, record the job, stream the Ray Data graph,
show progress, and write `stats.json` once every part has committed."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline import __version__
from pipeline.builder import build_dataset, model_info
from pipeline.errors import SdxlBatchError, StorageError
from pipeline.io import filesystem, full_uri, join, write_bytes
from pipeline.manifest import plan_manifest
from pipeline.models.presets import check_job_settings, get_preset
from pipeline.settings import SettingDefaults
from pipeline.stats import JobStats
from pipeline.writer import METADATA_DIR

if TYPE_CHECKING:
    from pipeline.config import JobConfig

logger = logging.getLogger(__name__)
JOB_RECORD = "job.json"
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class JobResult:
    output: str
    rows: int
    wall_seconds: float
    images_per_second: float
    stats: dict[str, Any]

    def locations(self) -> dict[str, str]:
        return {
            "images": join(self.output, "images" if self.stats["layout"] == "files" else "shards"),
            "metadata": join(self.output, METADATA_DIR),
            "stats": join(self.output, STATS_FILE),
        }


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` (`auto`: the one `ray start` runs on this machine), or start
    an embedded local Ray when it is None.

    The embedded Ray serves this process alone, so it listens on loopback only: Ray otherwise
    binds its node to the machine's network address. (Ray reads this switch, named for its
    macOS/Windows single-node mode, when it is imported.)
    """
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    ray.init(
        # "local" always starts a new instance; None would attach to whatever cluster `ray start`
        # last recorded on this machine (even a dead one), which is not what the user asked for.
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        # Workers import transformers before our code can quiet it; these stop the import-time chatter.
        runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
    )
    _quiet_ray_data_console()


def _quiet_ray_data_console() -> None:
    """Ray Data prints its execution plan at INFO on the console; our progress line says enough.
    Its full log still goes to the session's ray-data.log file."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(fs: Any, path: str, record: dict[str, Any]) -> None:
    try:
        write_bytes(fs, path, json.dumps(record, indent=2, default=str).encode())
    except OSError as error:
        raise StorageError(f"cannot write to the output {full_uri(fs, path)}: {error}") from None


def run_job(config: JobConfig, *, ray_address: str | None = None, progress: bool = True) -> JobResult:
    """Render every row of the manifest into the output; returns where the results are."""
    start = time.perf_counter()
    started_at = _now()
    preset = get_preset(config.model.preset)
    defaults = SettingDefaults.from_config(config.generation, preset)
    check_job_settings(preset, steps=defaults.steps, guidance_scale=defaults.guidance_scale)
    plan = plan_manifest(config.manifest, config.storage)
    fs, root = filesystem(config.output, config.storage)
    output = full_uri(fs, root)
    _write_json(fs, join(root, JOB_RECORD), {
        "version": __version__,
        "started_at": started_at,
        "manifest_files": plan.files,
        "manifest_rows": plan.total_rows,
        "config": config.model_dump(mode="json"),  # SecretStr fields dump as '**********'
    })  # fmt: skip
    init_ray(ray_address)
    stats = JobStats()
    dataset = build_dataset(config, plan.fragments)
    with _progress_bar(plan.total_rows, enabled=progress) as bar:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                assert isinstance(batch, pa.Table)
                for summary in batch.to_pylist():
                    stats.add_part(summary)
                    bar.update(int(summary["rows"]))
        except Exception as error:
            cause = user_error(error)
            if cause is not None:
                raise cause from None
            raise
    wall = time.perf_counter() - start
    model = model_info(config)
    record = stats.to_dict(
        wall_seconds=wall,
        manifest_rows=plan.total_rows,
        extra={
            "layout": config.write.layout,
            "image_format": config.generation.image_format,
            "model": model.model,
            "scheduler": model.scheduler,
            "batch_size": config.generation.batch_size,
            "actors": config.resources.actors,
            "started_at": started_at,
            "finished_at": _now(),
        },
    )
    _write_json(fs, join(root, STATS_FILE), record)
    return JobResult(
        output=output, rows=stats.rows, wall_seconds=wall, images_per_second=record["images_per_second"], stats=record
    )


def user_error(error: BaseException) -> SdxlBatchError | None:
    """Find our own error inside the exceptions Ray wraps around a failed task."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SdxlBatchError):
            return current
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None


def _progress_bar(total: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="rendering",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
        bar_format="{desc}: {n}/{total} rows |{bar}| {rate_fmt} elapsed {elapsed} ETA {remaining}",
    )

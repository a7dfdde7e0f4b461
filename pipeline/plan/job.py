"""Checking a job before any GPU work: `sdxl-batch validate`, and the first step of `run`.

`plan_job` checks the config against the preset (steps, guidance, image size), plans the
manifest in one streaming pass that checks every row, reads what the output already holds
(resume) and refuses an output produced with other settings. Structural problems raise at once;
bad rows are counted and, with `on_bad_row: fail` (the default), stop the job naming the first
ones (`raise_for_bad_rows`); with `on_bad_row: skip` they are written to `rejects/` with their
reason and the rest renders.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import BadRows, StorageError
from pipeline.core.io import STORAGE_ERRORS, filesystem, full_uri, is_remote_fs, join, write_bytes
from pipeline.core.layout import (
    DAMAGED_DIR,
    JOB_RECORD,
    METADATA_FIELDS,
    REJECTS_DIR,
    STATS_FILE,
    committed_parts,
    read_json,
    safe_name,
)
from pipeline.core.words import count
from pipeline.models.presets import Preset, check_job_settings, get_preset
from pipeline.plan.executor import LocalExecutor, PlanExecutor
from pipeline.plan.ledger import check_fingerprint, read_committed_schema, settings_fingerprint
from pipeline.plan.manifest import rules_for
from pipeline.plan.rows import RowPlan, plan_rows
from pipeline.plan.schema import resume_passthrough
from pipeline.plan.settings import SettingDefaults

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import JobConfig

SHOWN_PROBLEMS = 10


@dataclass
class JobPlan:
    """Everything known about a job before it starts: O(files + parts + bad rows), never O(rows)."""

    config: JobConfig
    preset: Preset
    defaults: SettingDefaults
    manifest: RowPlan
    fingerprint: dict[str, Any]
    output: str
    previous_stats: dict[str, Any] | None = None
    # The manifest's pass-through columns as every metadata part has them (plan.schema).
    passthrough: pa.Schema = field(default_factory=lambda: pa.schema([]))

    @property
    def pending_rows(self) -> int:
        """Rows still to render (not done, not rejected)."""
        return self.manifest.pending_rows

    @property
    def done_rows(self) -> int:
        """Good rows already in the output (a rejected duplicate of a done id is not counted)."""
        return self.manifest.done_rows

    def render_groups(self) -> list[tuple[tuple[int, int, int, float], int]]:
        """(width, height, steps, guidance) of the rows still to render, with their counts."""
        d = self.defaults
        merged: dict[tuple[int, int, int, float], int] = {}
        for (width, height, steps, guidance), rows in self.manifest.pending_settings.items():
            key = (
                int(width if width is not None else d.width),
                int(height if height is not None else d.height),
                int(steps if steps is not None else d.steps),
                float(guidance if guidance is not None else d.guidance_scale),
            )
            merged[key] = merged.get(key, 0) + rows
        return sorted(merged.items(), key=lambda item: -item[1])

    def model_calls(self) -> int:
        """Model calls at the configured batch size (rows batch only with equal settings)."""
        batch = self.config.generation.batch_size
        return sum(math.ceil(count / batch) for _, count in self.render_groups())

    def estimate(self) -> tuple[float, str] | None:
        """GPU-seconds to render the pending rows, and where the per-image figure comes from.

        Known when an earlier run into this output measured it with the same settings."""
        stats = self.previous_stats
        if not stats or not stats.get("rows") or not stats.get("seconds_per_image"):
            return None
        per_image = float(stats["seconds_per_image"])
        return self.pending_rows * per_image, f"{per_image:.3f} s/image measured by the previous run into this output"

    def summary_lines(self) -> list[str]:
        m, c = self.manifest, self.config
        n = m.images_per_prompt
        images = "" if n == 1 else f", {n} images each: {count(m.total_rows, 'image')}"
        how = "" if c.manifest_format == "auto" else f" (manifest_format: {c.manifest_format})"
        lines = [
            f"manifest   {c.manifest}{how}: {count(len(m.files), 'file')}, {count(m.manifest_rows, 'row')}{images}",
            f"model      {self.preset.name} ({self.preset.weights_label()}; {self.preset.scheduler_label()})",
            f"output     {self.output}",
        ]
        if len(self.passthrough):
            columns = ", ".join(f"{f.name} ({f.type})" for f in self.passthrough)
            lines.append(f"metadata   the fixed columns, then the manifest's: {columns}")
        if m.problem_count:
            kinds = ", ".join(f"{n:,} {k}" for k, n in m.problem_columns.most_common())
            action = "listed in rejects/, the rest renders" if c.on_bad_row == "skip" else "the job will not start"
            lines.append(f"bad rows   {m.problem_count:,} ({kinds}); on_bad_row: {c.on_bad_row}: {action}")
        if m.damaged_parts:
            names = ", ".join(f"{posixpath.basename(path)} ({why})" for path, why in m.damaged_parts[:3])
            more = f" and {len(m.damaged_parts) - 3} more" if len(m.damaged_parts) > 3 else ""
            lines.append(
                f"damaged    {len(m.damaged_parts):,} committed part(s) cannot be read: {names}{more}; `run` "
                f"moves them aside to {DAMAGED_DIR}/ and renders their rows again"
            )
        unit = "row" if m.images_per_prompt == 1 else "image"  # an output row is an image
        if self.done_rows:
            lines.append(f"done       {count(self.done_rows, unit)} already in the output (skipped: resume)")
        lines.append(f"to render  {count(self.pending_rows, unit)}")
        for (width, height, steps, guidance), rows in self.render_groups():
            lines.append(f"           {width}x{height}, {steps} steps, guidance {guidance:g}: {count(rows, unit)}")
        calls = self.model_calls()
        if c.fleet:
            fleet = ", ".join(
                f"{name} (batch {t.batch_size}, {t.actors_per_gpu} actor(s) per GPU)" for name, t in c.fleet.items()
            )
            lines.append(f"batches    a mixed fleet: {fleet}; work goes to whichever actor is free")
        else:
            batch = c.generation.batch_size
            lines.append(f"batches    {count(calls, 'model call')} (batch size {batch}) on {c.resources.describe()}")
        if self.pending_rows:
            lines.append(self.estimate_line())
        return lines

    def startup_seconds(self) -> float | None:
        """The previous run's start-up and finishing (`stats.json`'s `wall_breakdown_seconds`:
        planning, starting Ray, starting the generators, finishing), which a run pays whatever it
        renders; None before a run has measured them."""
        phases = (self.previous_stats or {}).get("wall_breakdown_seconds")
        if not isinstance(phases, dict):
            return None
        return float(sum(phases.get(k, 0.0) for k in ("planning", "starting_ray", "starting_generators", "finishing")))

    def estimate_line(self) -> str:
        """`validate`'s estimate of the run's wall time: start-up, then rendering, and what each
        figure is based on."""
        estimate = self.estimate()
        if estimate is None:
            return (
                "estimate   unknown: no run into this output has measured these settings yet (`sdxl-batch "
                "estimate` measures them; start-up alone, Ray and the model's load, takes 10 s to a few minutes)"
            )
        seconds, source = estimate
        # Automatic placement: as many actors as the previous run resolved.
        c = self.config
        actors = c.resources.max_actors if c.resources.actors else int((self.previous_stats or {}).get("actors") or 1)
        rendering = seconds / actors
        startup = self.startup_seconds()
        if startup is None:
            return (
                f"estimate   {human_duration(rendering)} of rendering on {actors} actor(s) ({source}; "
                f"{human_duration(seconds)} of generator time), plus start-up (Ray, the model's load: not measured)"
            )
        return (
            f"estimate   about {human_duration(startup + rendering)}: start-up and finishing "
            f"{human_duration(startup)} (as the previous run's), rendering {human_duration(rendering)} on "
            f"{actors} actor(s) ({source})"
        )


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def check_job(config: JobConfig) -> tuple[Preset, SettingDefaults]:
    """The config's own settings against the preset's limits (before anything is read)."""
    preset = get_preset(config.model.preset)
    defaults = SettingDefaults.from_config(config.generation, preset)
    check_job_settings(
        preset,
        steps=defaults.steps,
        guidance_scale=defaults.guidance_scale,
        width=defaults.width,
        height=defaults.height,
    )
    return preset, defaults


def check_output_location(fs: AbstractFileSystem, root: str, output: str) -> None:
    """The output can be written where `run` will write it: locally, no file in the way and a
    writable folder (the nearest one that exists: the rest is created); on an object store, a
    bucket that exists. `validate` makes the same check, so a job that passes it does not stop at
    its first write."""
    if is_remote_fs(fs):
        if not hasattr(fs, "call_s3"):  # another object store: its first write says what is wrong
            return
        bucket = root.split("/", 1)[0]
        try:  # HEAD of the bucket (s3fs's `exists` answers False for any error, credentials included)
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(
                f"the output {output} is in a bucket that does not exist ({bucket}): create it, or check `output` "
                "and the storage endpoint"
            ) from None
        except STORAGE_ERRORS as error:
            raise StorageError(f"cannot reach the output {output}: {type(error).__name__}: {error}") from error
        return
    path = os.path.abspath(root)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under a file ({existing})"
        raise StorageError(
            f"the output {output} {where}: point `output` at a folder (it is created if missing), or move the file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write the output {output}: no write permission on {existing}")


def plan_job(config: JobConfig, *, overwrite: bool = False, executor: PlanExecutor | None = None) -> JobPlan:
    """Check the config and the manifest and find what is left to render; touches no GPU.

    `executor`: where the planning tasks run (`plan.rows`; default: in this process).
    Raises ConfigError, ModelError, ManifestError or StorageError for problems that stop the job;
    bad rows are returned in the plan (see `raise_for_bad_rows`)."""
    preset, defaults = check_job(config)
    fs, root = filesystem(config.output, config.storage)
    output = full_uri(fs, root)
    check_output_location(fs, root, output)
    fingerprint = settings_fingerprint(config)
    previous_stats = None
    committed: list[str] = []
    schema = None
    try:
        if not overwrite:
            committed = committed_parts(fs, root)
            schema = read_committed_schema(fs, committed)
            previous = read_json(fs, join(root, JOB_RECORD))
            if committed:
                check_fingerprint((previous or {}).get("fingerprint"), fingerprint, output)
            if previous and (previous.get("fingerprint") or {}).get("digest") == fingerprint["digest"]:
                previous_stats = read_json(fs, join(root, STATS_FILE))
        manifest = plan_rows(
            config.manifest,
            config.storage,
            executor=executor or LocalExecutor(),
            rules=rules_for(preset),
            keep_problems=config.on_bad_row == "skip",
            output=config.output,
            committed=committed,
            manifest_format=config.manifest_format,
            images_per_prompt=config.images_per_prompt,
        )
    except (OSError, pa.ArrowInvalid) as error:
        raise StorageError(f"cannot read the output {output}: {type(error).__name__}: {error}") from error
    passthrough = resume_passthrough(manifest.passthrough, schema, fixed=METADATA_FIELDS, output=output)
    return JobPlan(
        config=config,
        preset=preset,
        defaults=defaults,
        manifest=manifest,
        fingerprint=fingerprint,
        output=output,
        previous_stats=previous_stats,
        passthrough=passthrough,
    )


def raise_for_bad_rows(job: JobPlan) -> None:
    """With `on_bad_row: fail`, any bad row stops the job here, before any GPU work."""
    manifest = job.manifest
    if job.config.on_bad_row != "fail" or not manifest.problem_count:
        return
    shown = manifest.problem_lines(SHOWN_PROBLEMS)
    more = manifest.problem_count - len(shown)
    raise BadRows(
        f"{manifest.problem_count:,} bad row(s) in the manifest (row numbers count from 0 in each file):\n  "
        + "\n  ".join(shown)
        + (f"\n  ... and {more:,} more" if more > 0 else "")
        + "\nFix these rows, or set on_bad_row: skip to render the others and list these in rejects/."
    )


def write_rejects(job: JobPlan) -> list[str]:
    """`on_bad_row: skip`: one `rejects/<manifest file>.parquet` per manifest file with bad rows
    (file, row, id, column, reason, prompt, seed); stale files from earlier runs are removed, so
    rejects/ always describes the manifest as it is now. Returns the files written."""
    fs, root = filesystem(job.config.output, job.config.storage)
    folder = join(root, REJECTS_DIR)
    problems = job.manifest.problems
    written: list[str] = []
    try:
        existing = set(fs.find(folder)) if fs.exists(folder) else set()
        keep: set[str] = set()
        for file in pc.unique(problems.column("file")).to_pylist() if problems.num_rows else []:
            rows = problems.filter(pc.equal(problems.column("file"), file))
            relpath = posixpath.relpath(file, job.manifest.root) if file.startswith(job.manifest.root) else file
            path = join(folder, f"{safe_name(relpath.removesuffix('.parquet'))}.parquet")
            buffer = io.BytesIO()
            pq.write_table(rows, buffer, compression="zstd")
            write_bytes(fs, path, buffer.getvalue())
            keep.add(path)
            written.append(full_uri(fs, path))
        for stale in existing - keep:
            fs.rm(stale)
    except OSError as error:
        raise StorageError(f"cannot write rejects/ under the output {job.output}: {error}") from error
    return written

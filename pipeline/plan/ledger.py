"""Progress of an output prefix: what is done, and with which settings it was produced.

The ledger *is* the metadata: a row is done exactly when a committed `metadata/part-*.parquet`
lists it (parts are written last and atomically, after their images). So resuming needs no
extra state that could disagree with the data: the planner (`plan.rows`) reads the `id` column
of every part in parallel tasks, joins them with the manifest's ids by hash partition, and the
read stage skips those rows before they reach a GPU.

Ray Data's own job checkpointing (`DataContext.checkpoint_config`, Ray 2.60) is not used: it
hooks a Ray read op and a Datasink write op, while this graph starts from planned manifest
fragments and commits in its own write stage; its file backend wants a network-mounted path,
and it deletes its checkpoint on success by default, whereas incremental runs need the record to
persist. Our parts already give the guarantee it would add.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.io import filesystem, join
from pipeline.core.layout import OUTPUT_ENTRIES
from pipeline.models.presets import get_preset, vae_label
from pipeline.plan.parts import DAMAGE_ERRORS
from pipeline.plan.settings import SettingDefaults

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import JobConfig


def read_committed_schema(fs: AbstractFileSystem, parts: list[str]) -> pa.Schema | None:
    """The schema of the output's committed metadata parts (`layout.committed_parts`; one part's
    footer: every part of an output has the same, and `verify` checks it), or None when none is
    committed (a new output, an empty `metadata/`, or only the temporary file of a job killed
    during its first commit: nothing is done yet)."""
    for path in parts:  # the first that reads: a damaged part is the planner's to report (`read_part_ids`)
        try:
            with fs.open(path, "rb") as handle:
                return pq.read_schema(handle)
        except DAMAGE_ERRORS:
            continue
    return None


# Settings a job knows only once its GPUs are known: `model.dtype: auto` is resolved on the driver
# after Ray starts (`run.fleet.resolve_dtype`), and the VAE follows from the precision.
UNRESOLVED = "auto"


def settings_fingerprint(config: JobConfig) -> dict[str, Any]:
    """The settings that determine every image of an output; two runs into one output must agree.

    Everything that changes pixels is here: the weights, the sampler and its defaults, and the
    precision, the VAE, the attention kernels, compilation and fused projections. A mixed fleet
    renders with one of each (the per-type `fleet` settings change only how rows are batched)."""
    preset = get_preset(config.model.preset)
    defaults = SettingDefaults.from_config(config.generation, preset)
    model = config.model
    dtype = model.dtype
    settings = {
        "preset": preset.name,
        "model.path": model.path or preset.base,
        "model.unet": model.unet or preset.unet,
        "model.lora": model.lora or preset.lora,
        "model.loras": [[lora.path, lora.weight] for lora in model.loras],
        "model.vae": model.vae,
        "scheduler": preset.scheduler_label(),
        "width": defaults.width,
        "height": defaults.height,
        "steps": defaults.steps,
        "guidance_scale": defaults.guidance_scale,
        "image_format": config.generation.image_format,
        "layout": config.write.layout,
        "model.dtype": dtype,
        "vae": UNRESOLVED if dtype == UNRESOLVED else vae_label(model, preset, dtype),
        "model.attention": model.attention,
        "model.compile": model.compile,
        "model.fuse_qkv": model.fuse_qkv,
    }
    return _fingerprint(settings)


def _fingerprint(settings: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, "settings": settings}


def check_fingerprint(
    previous: dict[str, Any] | None, current: dict[str, Any], output: str, *, resolved: str = ""
) -> None:
    """Refuse to mix settings in one output: resumed rows would not match the finished ones.

    Compared key by key: a key the output's record lacks (written by an earlier version) and a
    setting not resolved (`auto`: checked again once the job's GPUs are known, or left to each
    actor on GPU types sdxl-batch does not know) do not count. `resolved`: how this job resolved
    `model.dtype: auto`, said when the precision is what changed."""
    if not previous or previous.get("digest") == current["digest"]:
        return
    before, after = previous.get("settings", {}), current["settings"]
    changed = [
        key
        for key in after
        if key in before and UNRESOLVED not in (after[key], before[key]) and before[key] != after[key]
    ]
    if not changed:
        return
    what = "; ".join(f"{key}: {before[key]!r} -> {after[key]!r}" for key in changed)
    why = f" (model.dtype auto: {resolved})" if resolved and "model.dtype" in changed else ""
    raise ConfigError(
        f"the output {output} was produced with other settings ({what}){why}. Every row of an output renders "
        "with the same settings: resume with the original ones (e.g. set model.dtype explicitly), choose a new "
        "output, or pass --overwrite to discard it."
    )


def recorded_fingerprint(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint a job records: its own, except that a setting it left unresolved (it
    rendered nothing, so it never resolved `auto`) keeps the value the output already records."""
    before = (previous or {}).get("settings") or {}
    kept = {key: before[key] for key, value in current["settings"].items() if value == UNRESOLVED and key in before}
    if not kept:
        return current
    return _fingerprint({**current["settings"], **kept})


def clear_output(config: JobConfig) -> None:
    """`--overwrite`: remove everything a job writes under the output prefix (and nothing else)."""
    fs, root = filesystem(config.output, config.storage)
    for entry in OUTPUT_ENTRIES:
        path = join(root, entry)
        if fs.exists(path):
            fs.rm(path, recursive=True)

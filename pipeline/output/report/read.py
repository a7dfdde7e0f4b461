"""Reading what the report shows from an output prefix.

Scale: a million-row job has thousands of parts. Only the metadata's `id` column is read in full
(to spread the samples evenly), then only the files holding sampled rows, and only the sampled
images; the small stats records are fetched together (`fs.cat` on a list, concurrent on S3).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.core.errors import SdxlBatchError, StorageError
from pipeline.core.io import join
from pipeline.core.layout import (
    JOB_RECORD,
    METADATA_DIR,
    STATS_FILE,
    committed_parts,
    part_stats_paths,
    read_json,
)
from pipeline.output.stats import PartStats

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

# Columns the contact sheet shows; older outputs may lack some, so only those present are read.
SAMPLE_COLUMNS = ("id", "prompt", "seed", "width", "height", "steps", "model", "scheduler", "image_path", "tar_member")


@dataclass
class OutputContents:
    """What the report is made of, as read from one output prefix."""

    output: str
    stats: dict[str, Any] | None  # stats.json: the last run
    parts: list[PartStats]  # stats/part-*.json: every committed part of every run
    job: dict[str, Any] | None
    metadata_rows: int
    metadata_parts: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # metadata rows, sorted by id
    images: list[bytes | None] = field(default_factory=list)  # the samples' images (None: unreadable)


def read_output(fs: AbstractFileSystem, root: str, output: str, *, samples: int) -> OutputContents:
    """Read the stats, the job record, and `samples` metadata rows with their images."""
    try:
        return _read_output(fs, root, output, samples=samples)
    except (OSError, pa.ArrowException) as error:  # no access, or a damaged metadata part
        raise StorageError(
            f"cannot read the output {output}: {type(error).__name__}: {error} (`sdxl-batch verify {output}` "
            "checks every part)"
        ) from None


def _read_output(fs: AbstractFileSystem, root: str, output: str, *, samples: int) -> OutputContents:
    if not fs.exists(root):
        raise SdxlBatchError(
            f"nothing to report: the output {output} does not exist (point `sdxl-batch report` at a job's output)"
        )
    files = committed_parts(fs, root)
    if not files:
        raise SdxlBatchError(
            f"nothing to report under {output}: no committed part (looked for {join(output, METADATA_DIR)}/"
            "part-*.parquet); run the job first, or check the output prefix"
        )
    contents = OutputContents(
        output=output,
        stats=read_json(fs, join(root, STATS_FILE)),
        parts=_read_part_records(fs, root),
        job=read_json(fs, join(root, JOB_RECORD)),
        metadata_rows=0,
        metadata_parts=len(files),
    )
    contents.metadata_rows, contents.samples = _pick_samples(fs, files, samples)
    contents.images = _read_images(fs, root, contents.samples)
    return contents


def _read_part_records(fs: AbstractFileSystem, root: str) -> list[PartStats]:
    paths = part_stats_paths(fs, root)
    if not paths:
        return []
    records = []
    for path, data in sorted(fs.cat(paths, on_error="return").items()):
        try:
            if isinstance(data, BaseException):
                raise data
            record = json.loads(data)
        except (OSError, ValueError) as error:  # a damaged record costs its part's figures, not the report
            logger.warning("ignoring the stats record %s: %s", path, error)
            continue
        if isinstance(record, dict):
            records.append(PartStats.from_dict(record))
    return records


def _pick_samples(fs: AbstractFileSystem, files: list[str], samples: int) -> tuple[int, list[dict[str, Any]]]:
    """The total row count and `samples` rows spread evenly over the sorted ids.

    Reads the `id` column of every part, then only the parts that hold a sampled row."""
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    ids = dataset.to_table(columns=["id", "__filename"])
    total = ids.num_rows
    if samples <= 0 or total == 0:
        return total, []
    order = pc.sort_indices(ids, sort_keys=[("id", "ascending")]).to_numpy()
    picked = ids.take(order[np.unique(np.linspace(0, total - 1, min(samples, total)).round().astype(np.int64))])
    wanted = picked.column("id").to_pylist()
    holders = sorted(set(picked.column("__filename").to_pylist()))
    columns = [c for c in SAMPLE_COLUMNS if c in dataset.schema.names]
    table = pads.dataset(holders, format="parquet", filesystem=fs).to_table(
        columns=columns, filter=pc.field("id").isin(wanted)
    )
    by_id = {row["id"]: row for row in table.to_pylist()}  # a duplicated id (a broken output) shows once
    return total, [by_id[i] for i in sorted(by_id)]


def _read_images(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]]) -> list[bytes | None]:
    """The sampled rows' image bytes (None where unreadable): files are fetched together, tar
    members read from their shards in parallel."""
    images: list[bytes | None] = [None] * len(rows)
    files = {i: join(root, row["image_path"]) for i, row in enumerate(rows) if not row.get("tar_member")}
    if files:
        try:
            fetched = fs.cat(list(files.values()), on_error="return")
        except FileNotFoundError:  # fsspec raises when none of the paths exists
            fetched = {}
        for i, path in files.items():
            data = fetched.get(path)
            images[i] = data if isinstance(data, bytes) else None
    shards: dict[str, dict[str, int]] = defaultdict(dict)  # shard -> member -> sample index
    for i, row in enumerate(rows):
        if row.get("tar_member"):
            shards[row["image_path"]][row["tar_member"]] = i

    def read_shard(shard: str) -> dict[str, bytes]:
        return _read_tar_members(fs, join(root, shard), set(shards[shard]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for shard, found in zip(shards, pool.map(read_shard, shards), strict=True):
            for member, i in shards[shard].items():
                images[i] = found.get(member)
    return images


def _read_tar_members(fs: AbstractFileSystem, path: str, members: set[str]) -> dict[str, bytes]:
    """Read some members of a tar shard, stopping once all are found: a shard can be gigabytes,
    and tarfile seeks past the members it skips (ranged reads on an object store)."""
    found: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if info.name in members and info.isfile():
                    extracted = tar.extractfile(info)
                    if extracted is not None:
                        found[info.name] = extracted.read()
                    if len(found) == len(members):
                        break
    except (OSError, tarfile.TarError) as error:
        logger.warning("cannot read the samples from %s: %s", path, error)
    return found

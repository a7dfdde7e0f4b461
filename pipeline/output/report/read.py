"""Reading what the report shows from an output prefix.

Scale: a 100-million-row job has some 200,000 parts. Only their footers are read (row counts and
each part's smallest id) to spread the samples, then only the parts holding sampled rows, and only
the sampled images; the small stats records are fetched in batches (`fs.cat` on a list, concurrent
on S3) and added up (`PartsDigest`). Footers and records are read by tasks over groups of parts
(`plan.executor`: Ray tasks where the data is, for a large output, as `verify` does), each
returning a small result: the driver holds a footer per part and one digest at a time.
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
import pyarrow.parquet as pq

from pipeline.core.errors import SdxlBatchError, StorageError
from pipeline.core.io import filesystem, join
from pipeline.core.layout import (
    JOB_RECORD,
    METADATA_DIR,
    STATS_FILE,
    committed_parts,
    part_stats_paths,
    read_json,
)
from pipeline.output.report.figures import PartsDigest
from pipeline.output.stats import PartStats
from pipeline.output.streaming import bounded_map, read_columns
from pipeline.plan.executor import LocalExecutor

if TYPE_CHECKING:
    from collections.abc import Callable

    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig
    from pipeline.plan.executor import PlanExecutor

logger = logging.getLogger(__name__)

# Columns the contact sheet shows; older outputs may lack some, so only those present are read.
SAMPLE_COLUMNS = ("id", "prompt", "seed", "width", "height", "steps", "model", "scheduler", "image_path", "tar_member")


@dataclass
class OutputContents:
    """What the report is made of, as read from one output prefix."""

    output: str
    stats: dict[str, Any] | None  # stats.json: the last run
    records: PartsDigest  # stats/part-*.json: every committed part of every run, added up
    job: dict[str, Any] | None
    metadata_rows: int
    metadata_parts: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # metadata rows, sorted by id
    images: list[bytes | None] = field(default_factory=list)  # the samples' images (None: unreadable)
    writer: str | None = None  # a job holding the output's lease as the report is read (`output.lease`)


def read_output(
    fs: AbstractFileSystem,
    root: str,
    output: str,
    *,
    samples: int,
    storage: StorageConfig | None = None,
    executor: Callable[[int], PlanExecutor] | None = None,
) -> OutputContents:
    """Read the stats, the job record, and `samples` metadata rows with their images; `executor`
    picks where the parts are read from their count (default: in this process)."""
    try:
        return _read_output(fs, root, output, samples=samples, storage=storage, executor=executor)
    except (OSError, pa.ArrowException) as error:  # no access, or a damaged metadata part
        raise StorageError(
            f"cannot read the output {output}: {type(error).__name__}: {error} (`sdxl-batch verify {output}` "
            "checks every part)"
        ) from error


def _read_output(
    fs: AbstractFileSystem,
    root: str,
    output: str,
    *,
    samples: int,
    storage: StorageConfig | None,
    executor: Callable[[int], PlanExecutor] | None,
) -> OutputContents:
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
    tasks = LocalExecutor() if executor is None else executor(len(files))
    contents = OutputContents(
        output=output,
        stats=read_json(fs, join(root, STATS_FILE)),
        records=_read_part_records(tasks, output, storage, part_stats_paths(fs, root)),
        job=read_json(fs, join(root, JOB_RECORD)),
        metadata_rows=0,
        metadata_parts=len(files),
    )
    contents.metadata_rows, contents.samples = _pick_samples(fs, files, samples, tasks, output, storage)
    contents.images = _read_images(fs, root, contents.samples)
    return contents


_RECORDS_AT_ONCE = 1000  # stats records fetched by one `fs.cat` (concurrently on S3)


def _cat(fs: AbstractFileSystem, paths: list[str]) -> dict[str, bytes | BaseException]:
    found: dict[str, bytes | BaseException] = fs.cat(paths, on_error="return")
    return found


PARTS_PER_TASK = 2000  # footers or stats records read by one task


def _groups(paths: list[str]) -> list[list[str]]:
    return [paths[start : start + PARTS_PER_TASK] for start in range(0, len(paths), PARTS_PER_TASK)]


def _read_part_records(
    executor: PlanExecutor, output: str, storage: StorageConfig | None, paths: list[str]
) -> PartsDigest:
    """Every part's stats record, added up by a task per group, the groups' digests merged here
    one at a time."""
    digest = PartsDigest()
    for handle in [executor.submit(digest_records, output, storage, group) for group in _groups(paths)]:
        digest.merge(executor.get([handle])[0])
    return digest


def digest_records(output: str, storage: StorageConfig | None, paths: list[str]) -> PartsDigest:
    """A group of stats records added up as they arrive (a bounded window of fetches)."""
    fs, _ = filesystem(output, storage)
    digest = PartsDigest()
    batches = [paths[start : start + _RECORDS_AT_ONCE] for start in range(0, len(paths), _RECORDS_AT_ONCE)]
    for path, data in (
        item
        for batch in bounded_map(lambda batch: _cat(fs, batch), batches, threads=4)
        for item in sorted(batch.items())
    ):
        try:
            if isinstance(data, BaseException):
                raise data
            record = json.loads(data)
        except (OSError, ValueError) as error:  # a damaged record costs its part's figures, not the report
            logger.warning("ignoring the stats record %s: %s", path, error)
            continue
        if isinstance(record, dict):
            digest.add(PartStats.from_dict(record))
    return digest


@dataclass(frozen=True)
class _PartFooter:
    path: str
    rows: int
    first_id: str | None  # the smallest id, from the footer's statistics (None: not recorded)


def _part_footer(fs: AbstractFileSystem, path: str) -> _PartFooter:
    with fs.open(path, "rb") as handle:
        metadata = pq.read_metadata(handle)
    smallest: list[str] = []
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            column = row_group.column(index)
            if column.path_in_schema == "id" and column.statistics is not None and column.statistics.has_min_max:
                smallest.append(str(column.statistics.min))
    first = min(smallest) if len(smallest) == metadata.num_row_groups and smallest else None
    return _PartFooter(path, metadata.num_rows, first)


def part_footers(output: str, storage: StorageConfig | None, paths: list[str]) -> list[_PartFooter]:
    fs, _ = filesystem(output, storage)
    return list(bounded_map(lambda path: _part_footer(fs, path), paths))


def _pick_samples(
    fs: AbstractFileSystem,
    files: list[str],
    samples: int,
    executor: PlanExecutor,
    output: str,
    storage: StorageConfig | None,
) -> tuple[int, list[dict[str, Any]]]:
    """The total row count and `samples` rows spread evenly over the output, sorted by id.

    Reads only the parts' footers, then the parts that hold a sampled row: the parts are ordered
    by their smallest id (the footer's statistics), each part's rows by id, and the rows at evenly
    spaced positions of that order are taken. Where parts hold disjoint runs of ids, as parts cut
    from a sorted manifest do, that is exactly an even spread over the sorted ids."""
    handles = [executor.submit(part_footers, output, storage, group) for group in _groups(files)]
    footers = [footer for group in executor.get(handles) for footer in group]
    total = sum(f.rows for f in footers)
    if samples <= 0 or total == 0:
        return total, []
    footers.sort(key=lambda f: (f.first_id is None, f.first_id or "", f.path))
    positions = np.unique(np.linspace(0, total - 1, min(samples, total)).round().astype(np.int64))
    starts = np.cumsum([0, *(f.rows for f in footers)])
    holder = np.searchsorted(starts, positions, side="right") - 1
    wanted = {footers[h].path: (positions[holder == h] - starts[h]).tolist() for h in np.unique(holder)}
    with fs.open(files[0], "rb") as handle:
        present = pq.read_schema(handle).names
    columns = [c for c in SAMPLE_COLUMNS if c in present]

    def sampled(path: str) -> list[dict[str, Any]]:
        table = read_columns(fs, path, columns)
        order = pc.sort_indices(table, sort_keys=[("id", "ascending")])
        rows: list[dict[str, Any]] = table.take(pc.take(order, pa.array(wanted[path], pa.int64()))).to_pylist()
        return rows

    by_id = {row["id"]: row for rows in bounded_map(sampled, sorted(wanted), threads=8) for row in rows}
    return total, [by_id[i] for i in sorted(by_id)]  # a duplicated id (a broken output) shows once


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

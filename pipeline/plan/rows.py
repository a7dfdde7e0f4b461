"""Planning every row of a job where the data is, without the driver ever holding the rows.

A job of 100 million rows has gigabytes of ids; the head node that runs the driver is usually
small. So the driver holds what grows with the manifest's *files* and the output's *parts*, and
the bad rows it reports, never anything per row. The work runs as tasks (`plan.executor`: Ray
tasks on a cluster, plain calls in this process for small manifests), in three waves:

1. `scan_file`, one task per manifest file: checks the schema and every row (`row_problems`),
   reads the ids (or derives them) and splits the good rows' `(id, file, row)` into P hash
   partitions (`core.partition`); beside them, the file's bad-row mask and a per-row code of its
   render settings. `read_done`, one task per batch of committed metadata parts: their ids, split
   the same way. Only small summaries (row groups, problems, distinct settings) reach the driver.
2. `join_partition`, one task per partition: every later occurrence of an id is a duplicate
   (`duplicate id`, a bad row naming the first occurrence), every id a committed part lists is
   done. It returns the rows to skip, split by groups of manifest files.
3. `finish_files`, one task per group of files: each file's pending rows as a packed bit mask
   (kept in the object store, read by the read stage), and per row group the count of rows to
   render and per setting the counts the summary prints.

The same id lands in the same partition whoever reads it, so each join sees all its occurrences
and all its committed copies; planning time falls as nodes are added, and no task holds more than
a partition of the ids.
"""

from __future__ import annotations

import itertools
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.core.errors import ManifestError
from pipeline.core.io import filesystem, full_uri
from pipeline.core.partition import split_by_partition
from pipeline.plan.formats import AUTO
from pipeline.plan.manifest import (
    COLUMNS,
    GENERIC_RULES,
    MAX_KEPT_PROBLEMS,
    PROBLEM_SCHEMA,
    SETTING_COLUMNS,
    Fragment,
    Problems,
    RowRules,
    check_schema,
    derive_ids,
    expand_rows,
    format_hint,
    image_ids,
    list_manifest_files,
    open_parquet,
    read_fragment,
    read_row_group,
    row_problems,
)
from pipeline.plan.parts import DAMAGE_ERRORS, read_part_ids
from pipeline.plan.schema import PassthroughSchema

if TYPE_CHECKING:
    from pipeline.core.config import StorageConfig
    from pipeline.plan.executor import PlanExecutor

Settings = tuple[float | None, float | None, float | None, float | None]  # width, height, steps, guidance
_NULL_SETTING = -1.0  # stands for "the job's default" in settings codes (no valid value is negative)
PARTS_PER_TASK = 256  # committed metadata parts read by one task
FILE_GROUPS = 32  # at most this many `finish_files` tasks
BYTES_PER_PARTITION = 64 * 2**20  # of manifest Parquet per partition: a few million rows, ~100 MB of ids
_KEY_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("row", pa.int64())])
_SKIP_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64())])
_DUPLICATE_SCHEMA = pa.schema([
    ("file", pa.int32()), ("row", pa.int64()), ("id", pa.string()), ("first_file", pa.int32()),
    ("first_row", pa.int64()),
])  # fmt: skip


@dataclass(frozen=True)
class ManifestFile:
    """One file of the manifest: its position in the job (files in name order), where it is, and
    the job's `manifest_format` (`auto`: the file is read by its extension, `formats.read_as`)."""

    index: int
    uri: str
    relpath: str
    format: str = AUTO


@dataclass
class FileScan:
    """What a file's scan tells the driver: small, whatever the file's size."""

    index: int
    uri: str
    relpath: str
    schema: pa.Schema
    row_groups: list[int]  # rows per row group
    problems: pa.Table  # PROBLEM_SCHEMA: all bad rows, or the first few (`keep_all`)
    problem_count: int
    problem_columns: Counter[str]
    settings: list[Settings]  # the file's distinct per-row settings; its codes index this list
    format: str = AUTO  # the job's `manifest_format` (`auto`: by the file's extension)

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


@dataclass
class JoinSummary:
    duplicates: pa.Table  # _DUPLICATE_SCHEMA: every later occurrence of an id (or the first few)
    duplicate_count: int
    done_rows: int  # good rows whose id a committed part lists


@dataclass
class FilePending:
    index: int
    row_groups: list[int]  # images to render per row group
    settings: dict[int, int]  # images to render per settings code


def scan_file(
    file: ManifestFile,
    storage: StorageConfig | None,
    rules: RowRules,
    keep_all: bool,
    partitions: int,
    images: int = 1,
) -> tuple[Any, ...]:
    """Check one manifest file and partition its good rows' ids. Returns the `FileScan`, the bad-row
    mask, the settings codes, then the `partitions` tables of (id, file, row). With `images` N
    (`images_per_prompt`) the tables hold each good row's N images: their ids (`image_ids`) at
    positions row * N + k, which the pending masks index; the mask and codes stay per row."""
    fs, path = filesystem(file.uri, storage)
    problems = Problems(keep_all)
    row_groups: list[int] = []
    ids_chunks: list[pa.Array] = []
    bad_chunks: list[np.ndarray] = []
    setting_chunks: list[np.ndarray] = []
    with open_parquet(fs, path, file.uri, file.format) as parquet:
        schema = parquet.schema_arrow
        check_schema(schema, file.uri, format_hint(path, file.format))
        columns = [c for c in ("id", "prompt", "seed", *SETTING_COLUMNS) if c in schema.names]
        offset = 0
        for index in range(parquet.metadata.num_row_groups):
            num_rows = parquet.metadata.row_group(index).num_rows
            table = read_row_group(parquet, Fragment(file.uri, file.relpath, index, offset, num_rows), columns)
            ids = table.column("id") if "id" in table.column_names else derive_ids(file.relpath, offset, num_rows)
            ids = pc.cast(ids, pa.string())
            bad, bad_columns, reasons = row_problems(table, rules)
            mask = np.zeros(num_rows, dtype=bool)
            mask[bad] = True
            if len(bad):
                taken = table.take(pa.array(bad, pa.int64()))
                problems.add(
                    file.uri,
                    bad + offset,
                    pc.take(ids, pa.array(bad)).to_pylist(),
                    bad_columns,
                    reasons,
                    taken.column("prompt").to_pylist(),
                    taken.column("seed").to_pylist(),
                )
            ids_chunks.extend(ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids])
            bad_chunks.append(mask)
            setting_chunks.append(_setting_matrix(table))
            row_groups.append(num_rows)
            offset += num_rows
    bad_mask = np.concatenate(bad_chunks) if bad_chunks else np.zeros(0, dtype=bool)
    settings, codes = _settings_codes(setting_chunks)
    good = np.flatnonzero(~bad_mask)
    positions = expand_rows(good, images)  # each good row's images
    ids = pc.take(pa.chunked_array(ids_chunks, pa.string()), pa.array(positions // images, pa.int64()))
    keys = pa.table(
        [
            image_ids(ids, positions % images) if images > 1 else ids,
            pa.array(np.full(len(positions), file.index, dtype=np.int32)),
            pa.array(positions, pa.int64()),
        ],
        schema=_KEY_SCHEMA,
    )
    scan = FileScan(
        index=file.index,
        uri=file.uri,
        relpath=file.relpath,
        schema=schema,
        row_groups=row_groups,
        problems=problems.table(),
        problem_count=problems.count,
        problem_columns=problems.by_column,
        settings=settings,
        format=file.format,
    )
    return (scan, bad_mask, codes, *split_by_partition(keys, "id", partitions))


def _setting_matrix(table: pa.Table) -> np.ndarray:
    """The rows' own width, height, steps and guidance as float64 columns (null: `_NULL_SETTING`)."""
    matrix = np.full((table.num_rows, len(SETTING_COLUMNS)), _NULL_SETTING)
    for column, name in enumerate(SETTING_COLUMNS):
        if name in table.column_names and not pa.types.is_null(table.column(name).type):
            values = pc.fill_null(pc.cast(table.column(name), pa.float64(), safe=False), _NULL_SETTING)
            matrix[:, column] = values.to_numpy(zero_copy_only=False)
    return matrix


def _settings_codes(chunks: list[np.ndarray]) -> tuple[list[Settings], np.ndarray]:
    """The distinct settings of a file's rows, and each row's index among them."""
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, len(SETTING_COLUMNS)))
    if not len(matrix) or (matrix == _NULL_SETTING).all():
        return [(None, None, None, None)], np.zeros(len(matrix), dtype=np.uint8)
    distinct, codes = np.unique(np.nan_to_num(matrix, nan=-2.0), axis=0, return_inverse=True)
    settings = [tuple(None if v == _NULL_SETTING else float(v) for v in row) for row in distinct]
    dtype = np.uint8 if len(settings) <= 2**8 else np.uint16 if len(settings) <= 2**16 else np.int32
    return settings, codes.reshape(-1).astype(dtype)  # type: ignore[return-value]


@dataclass(frozen=True)
class DoneBatch:
    """What a batch of committed parts tells the driver: its rows, and the parts that cannot be read."""

    rows: int
    damaged: tuple[tuple[str, str], ...] = ()  # (path, why)


def read_done(output: str, storage: StorageConfig | None, paths: list[str], partitions: int) -> tuple[Any, ...]:
    """The ids of a batch of committed metadata parts: a DoneBatch, then `partitions` tables. A
    damaged part (zero bytes, truncated) is skipped and named: its rows are pending again."""
    fs, _ = filesystem(output, storage)
    try:
        ids = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["id"])
        damaged: list[tuple[str, str]] = []
    except DAMAGE_ERRORS:  # one part or more cannot be read: find which, reading them one by one
        ids, damaged = read_part_ids(fs, paths)
    ids = ids.cast(pa.schema([("id", pa.string())]))
    return (DoneBatch(ids.num_rows, tuple(damaged)), *split_by_partition(ids, "id", partitions))


def join_partition(
    groups: list[tuple[int, int]], keep_all: bool, images: int, manifest_tables: int, *tables: pa.Table
) -> tuple[Any, ...]:
    """One partition: `manifest_tables` tables of (id, file, row) in file order, then the committed
    ids. Returns the `JoinSummary`, then per file group (`groups`: file index ranges) the rows to
    skip, (file, row) in order: later occurrences of an id and rows already done. With `images` N,
    rows are images (row * N + k) and a manifest's own id (image 0) comes before a derived one."""
    keys = pa.concat_tables(tables[:manifest_tables]) if manifest_tables else _KEY_SCHEMA.empty_table()
    done_ids = [t.column("id") for t in tables[manifest_tables:] if t.num_rows]
    duplicates, later = _duplicates(keys, keep_all, images)
    done = np.zeros(keys.num_rows, dtype=bool)
    if done_ids:
        done = np.asarray(pc.is_in(keys.column("id"), value_set=pa.chunked_array(done_ids).combine_chunks()))
        done = np.asarray(pc.fill_null(pa.array(done), False), dtype=bool)
    summary = JoinSummary(duplicates=duplicates[0], duplicate_count=duplicates[1], done_rows=int((done & ~later).sum()))
    skip = (
        keys.select(["file", "row"])
        .filter(pa.array(done | later))
        .sort_by([("file", "ascending"), ("row", "ascending")])
    )
    files = skip.column("file").to_numpy()
    bounds = np.searchsorted(files, [lo for lo, _ in groups] + [groups[-1][1]]) if groups else np.zeros(1, dtype=int)
    return (summary, *(skip.slice(int(a), int(b - a)) for a, b in itertools.pairwise(bounds)))


def _duplicates(keys: pa.Table, keep_all: bool, images: int = 1) -> tuple[tuple[pa.Table, int], np.ndarray]:
    """Every occurrence of an id after its first one (by file, then row), and the mask of them.
    With `images` N, a manifest's own id (image 0: row % N == 0) comes before every derived id
    (`<id>-<k>`): of rows `cat` and `cat-1`, image 1 of `cat` is the duplicate, and `cat-1` renders
    as it did with N = 1."""
    later = np.zeros(keys.num_rows, dtype=bool)
    counts = pc.value_counts(keys.column("id"))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return (_DUPLICATE_SCHEMA.empty_table(), 0), later
    positions = np.flatnonzero(np.asarray(pc.fill_null(pc.is_in(keys.column("id"), value_set=repeated), False)))
    rows = keys.take(pa.array(positions, pa.int64())).append_column("position", pa.array(positions, pa.int64()))
    rows = rows.append_column("derived", pa.array(rows.column("row").to_numpy() % images != 0))
    rows = rows.sort_by([("id", "ascending"), ("derived", "ascending"), ("file", "ascending"), ("row", "ascending")])
    ids = rows.column("id")
    same = np.zeros(rows.num_rows, dtype=bool)
    same[1:] = np.asarray(pc.equal(ids.slice(1), ids.slice(0, rows.num_rows - 1)))
    first = np.maximum.accumulate(np.where(same, 0, np.arange(rows.num_rows)))
    later[rows.column("position").to_numpy()[same]] = True
    shown = np.flatnonzero(same)
    if not keep_all:
        shown = shown[:MAX_KEPT_PROBLEMS]
    details = pa.table(
        [
            rows.column("file").take(pa.array(shown)),
            rows.column("row").take(pa.array(shown)),
            ids.take(pa.array(shown)),
            rows.column("file").take(pa.array(first[shown])),
            rows.column("row").take(pa.array(first[shown])),
        ],
        schema=_DUPLICATE_SCHEMA,
    )
    return (details, int(same.sum())), later


def finish_files(files: list[tuple[int, list[int]]], images: int, skip_tables: int, *args: Any) -> tuple[Any, ...]:
    """A group of files' pending rows: `skip_tables` tables of (file, row) to skip, then each
    file's bad-row mask and settings codes. Returns the `FilePending` list, then each file's
    pending rows as a packed bit mask (`np.packbits`). With `images` N, rows are images: a file's
    mask has N bits per row (row * N + k), and the counts are of images."""
    skip = pa.concat_tables(args[:skip_tables]) if skip_tables else _SKIP_SCHEMA.empty_table()
    skip_files, skip_rows = skip.column("file").to_numpy(), skip.column("row").to_numpy()
    summaries, masks = [], []
    for k, (index, row_groups) in enumerate(files):
        bad, codes = args[skip_tables + 2 * k], args[skip_tables + 2 * k + 1]
        if images > 1:
            bad, codes, row_groups = np.repeat(bad, images), np.repeat(codes, images), [g * images for g in row_groups]
        pending = ~bad
        pending[skip_rows[skip_files == index]] = False
        ends = np.cumsum(row_groups)
        totals = np.concatenate([[0], np.cumsum(pending)])
        per_group = np.diff(np.concatenate([[0], totals[ends]])).tolist()
        counted = np.bincount(codes[pending], minlength=1)
        summaries.append(FilePending(index, per_group, {c: int(n) for c, n in enumerate(counted) if n}))
        masks.append(np.packbits(pending))
    return (summaries, *masks)


def unpack_mask(packed: np.ndarray, rows: int) -> np.ndarray:
    return np.unpackbits(packed, count=rows).astype(bool)


@dataclass
class RowPlan:
    """What a manifest holds and what is left of it, planned without holding its rows.

    `masks` maps a file's index to a handle (a Ray object reference, or the array itself when
    planned in this process) of its packed pending-row mask, which only the read stage opens.

    Rows are output rows, images: with `images_per_prompt` N a manifest row is N of them (its
    positions row * N + k in the masks), and `total_rows`, `pending_rows`, `done_rows` and the
    settings counts count images (N = 1: the manifest's rows). `problem_count` counts the entries
    of `problems` (what rejects/ lists): a manifest row with a bad value once (all of its images
    are skipped), a duplicate id once per image; `rejected_rows` counts the images they skip.
    """

    root: str
    scans: list[FileScan] = field(repr=False)
    pending_row_groups: dict[int, list[int]] = field(repr=False)
    pending_settings: Counter[Settings]
    masks: dict[int, Any] = field(repr=False)
    problems: pa.Table = field(repr=False)
    problem_count: int
    problem_columns: Counter[str]
    done_rows: int
    committed_rows: int
    passthrough: pa.Schema
    damaged_parts: list[tuple[str, str]] = field(default_factory=list)  # (path, why): committed, unreadable
    images_per_prompt: int = 1
    rejected_rows: int | None = None  # images the problems skip (None: `problem_count`, as with N = 1)

    @property
    def files(self) -> list[str]:
        return [scan.uri for scan in self.scans]

    @property
    def manifest_rows(self) -> int:
        """The manifest's rows (each `images_per_prompt` images)."""
        return sum(scan.rows for scan in self.scans)

    @property
    def total_rows(self) -> int:
        """The images the manifest asks for: its rows times `images_per_prompt`."""
        return self.manifest_rows * self.images_per_prompt

    @property
    def good_rows(self) -> int:
        return self.total_rows - (self.problem_count if self.rejected_rows is None else self.rejected_rows)

    @property
    def pending_rows(self) -> int:
        return sum(sum(groups) for groups in self.pending_row_groups.values())

    def problem_lines(self, limit: int = 10) -> list[str]:
        return [
            f"file {r['file']}, row {r['row']}, column {r['column']!r}"
            + (f" (id {r['id']!r})" if r["id"] is not None else "")
            + f": {r['reason']}"
            for r in self.problems.slice(0, limit).to_pylist()
        ]

    def read_tasks(self) -> list[dict[str, Any]]:
        """One read task per row group with rows to render: the `Fragment`'s fields (its file's
        format and `images_per_prompt` among them), plus the file's index and length in images (to
        open its pending mask) and the images it will yield."""
        tasks = []
        images = self.images_per_prompt
        for scan in self.scans:
            offset = 0
            for group, (rows, pending) in enumerate(
                zip(scan.row_groups, self.pending_row_groups[scan.index], strict=True)
            ):
                if pending:
                    fragment = Fragment(scan.uri, scan.relpath, group, offset, rows, format=scan.format, images=images)
                    tasks.append(
                        {**asdict(fragment), "file": scan.index, "file_rows": scan.rows * images, "pending": pending}
                    )
                offset += rows
        return tasks

    def pending_mask(self, index: int) -> np.ndarray:
        """File `index`'s pending images as a bool array (gathered from wherever it was planned):
        one per row, or with `images_per_prompt` N, row * N + k for image k."""
        return unpack_mask(resolve(self.masks[index]), self.scans[index].rows * self.images_per_prompt)


def resolve(handle: Any) -> Any:
    """The value behind a planning handle: a Ray object reference is fetched, anything else is it."""
    if type(handle).__name__ == "ObjectRef":
        import ray

        return ray.get(handle)
    return handle


def read_pending(
    task: dict[str, Any], mask: np.ndarray, storage: StorageConfig | None, rules: RowRules = GENERIC_RULES
) -> pa.Table:
    """The pending rows of one read task (a row group), checked and normalised (`read_fragment`)."""
    fragment = Fragment(**{name: task[name] for name in Fragment.__dataclass_fields__ if name in task})
    images = fragment.images
    rows = mask[fragment.row_offset * images : (fragment.row_offset + fragment.num_rows) * images]
    return read_fragment(fragment, storage, rules=rules, reject=np.flatnonzero(~rows).tolist())


def iter_pending(plan: RowPlan, storage: StorageConfig | None, rules: RowRules = GENERIC_RULES) -> Iterator[pa.Table]:
    """Every pending row, read task by read task, in manifest order (`tune`'s samples, tests)."""
    masks: dict[int, np.ndarray] = {}
    for task in plan.read_tasks():
        if task["file"] not in masks:
            masks = {task["file"]: plan.pending_mask(task["file"])}
        yield read_pending(task, masks[task["file"]], storage, rules)


@dataclass(frozen=True)
class ScanHandles:
    """Handles to what `scan_file` returns, by name."""

    summary: Any  # FileScan
    bad: Any  # the file's bad-row mask
    codes: Any  # each row's settings code
    partitions: list[Any]  # (id, file, row) tables, one per partition

    @classmethod
    def of(cls, handles: list[Any]) -> ScanHandles:
        return cls(handles[0], handles[1], handles[2], handles[3:])


@dataclass(frozen=True)
class DoneHandles:
    """Handles to what `read_done` returns, by name."""

    summary: Any  # DoneBatch
    partitions: list[Any]  # committed id tables, one per partition

    @classmethod
    def of(cls, handles: list[Any]) -> DoneHandles:
        return cls(handles[0], handles[1:])


@dataclass(frozen=True)
class JoinHandles:
    """Handles to what `join_partition` returns, by name."""

    summary: Any  # JoinSummary
    skips: list[Any]  # (file, row) tables of rows to skip, one per group of files

    @classmethod
    def of(cls, handles: list[Any]) -> JoinHandles:
        return cls(handles[0], handles[1:])


@dataclass(frozen=True)
class FinishHandles:
    """Handles to what `finish_files` returns, by name."""

    summary: Any  # list[FilePending]
    masks: list[Any]  # each file's packed pending-row mask

    @classmethod
    def of(cls, handles: list[Any]) -> FinishHandles:
        return cls(handles[0], handles[1:])


def partitions_for(manifest_bytes: int, executor: PlanExecutor) -> int:
    """Hash partitions of the ids: one in this process; on Ray one per BYTES_PER_PARTITION of the
    manifest's Parquet, at least 4 (parallelism) and at most 256."""
    if not executor.distributed:
        return 1
    return int(min(256, max(4, -(-manifest_bytes // BYTES_PER_PARTITION))))


def plan_rows(
    manifest: str,
    storage: StorageConfig | None,
    *,
    executor: PlanExecutor,
    rules: RowRules = GENERIC_RULES,
    keep_problems: bool = False,
    output: str | None = None,
    committed: Sequence[str] = (),
    manifest_format: str = AUTO,
    images_per_prompt: int = 1,
) -> RowPlan:
    """Scan the manifest, join its ids with those of the `committed` metadata parts under
    `output`, and find the rows to render (the module docstring has the waves). Raises a
    ManifestError or StorageError for a structural problem; bad rows are in the plan.
    `manifest_format`: the job's (`auto`: each file by its extension); `images_per_prompt` N: each
    row is N images, each planned as a row of its own (`scan_file`), so resume, duplicates and the
    read stage work on images."""
    images = images_per_prompt
    fs, root, paths, sizes = list_manifest_files(manifest, storage, sizes=True, manifest_format=manifest_format)
    files = [ManifestFile(i, full_uri(fs, p), posixpath.relpath(p, root), manifest_format) for i, p in enumerate(paths)]
    partitions = partitions_for(sum(sizes) * images, executor)
    scans = [
        ScanHandles.of(
            executor.submit(scan_file, f, storage, rules, keep_problems, partitions, images, num_returns=3 + partitions)
        )
        for f in files
    ]
    batches = [list(committed[i : i + PARTS_PER_TASK]) for i in range(0, len(committed), PARTS_PER_TASK)]
    done = [
        DoneHandles.of(executor.submit(read_done, output, storage, batch, partitions, num_returns=1 + partitions))
        for batch in batches
    ]
    summaries: list[FileScan] = executor.get([scan.summary for scan in scans])
    passthrough = PassthroughSchema()
    for scan in summaries:
        passthrough.add(scan.schema, known=COLUMNS, uri=scan.uri)
    if not sum(scan.rows for scan in summaries):
        raise ManifestError(f"manifest {manifest} has no rows")
    groups = [(int(g[0]), int(g[-1]) + 1) for g in np.array_split(np.arange(len(files)), min(len(files), FILE_GROUPS))]
    joins = [
        JoinHandles.of(
            executor.submit(
                join_partition,
                groups,
                keep_problems,
                images,
                len(files),
                *(scan.partitions[p] for scan in scans),
                *(batch.partitions[p] for batch in done),
                num_returns=1 + len(groups),
            )
        )
        for p in range(partitions)
    ]
    finishes = [
        FinishHandles.of(
            executor.submit(
                finish_files,
                [(f, summaries[f].row_groups) for f in range(lo, hi)],
                images,
                partitions,
                *(join.skips[g] for join in joins),
                *(handle for f in range(lo, hi) for handle in (scans[f].bad, scans[f].codes)),
                num_returns=1 + hi - lo,
            )
        )
        for g, (lo, hi) in enumerate(groups)
    ]
    joined: list[JoinSummary] = executor.get([join.summary for join in joins])
    pending: list[list[FilePending]] = executor.get([finish.summary for finish in finishes])
    problems, count, columns = _problems(summaries, joined, keep_problems, images)
    done_batches: list[DoneBatch] = executor.get([batch.summary for batch in done])
    duplicates = sum(j.duplicate_count for j in joined)
    return RowPlan(
        root=full_uri(fs, root),
        scans=summaries,
        pending_row_groups={p.index: p.row_groups for group in pending for p in group},
        pending_settings=_settings(summaries, [p for group in pending for p in group]),
        masks={
            lo + k: handle
            for (lo, _), finish in zip(groups, finishes, strict=True)
            for k, handle in enumerate(finish.masks)
        },
        problems=problems,
        problem_count=count,
        problem_columns=columns,
        done_rows=sum(j.done_rows for j in joined),
        committed_rows=sum(batch.rows for batch in done_batches),
        passthrough=passthrough.schema(),
        damaged_parts=[part for batch in done_batches for part in batch.damaged],
        images_per_prompt=images,
        rejected_rows=(count - duplicates) * images + duplicates,
    )


def _settings(scans: list[FileScan], pending: list[FilePending]) -> Counter[Settings]:
    counts: Counter[Settings] = Counter()
    for file in pending:
        for code, rows in file.settings.items():
            counts[scans[file.index].settings[code]] += rows
    return counts


def _image_duplicate(first_uri: str, row: int, first: int, images: int) -> str:
    """Why image `row % images` of a row is a duplicate of image `first % images` of another."""
    k, j = row % images, first % images
    if k == j:  # the rows' own ids are equal: every image of theirs is
        return f"duplicate id (first at file {first_uri}, row {first // images}" + (f", image {k})" if k else ")")
    return (
        f"duplicate id: image {k} of this row has the id of image {j} of file {first_uri}, row {first // images} "
        f"(images_per_prompt {images}: image k of a row has the id <id>-<k>; give no row the id of another's "
        "followed by -<k>)"
    )


def _problems(
    scans: list[FileScan], joined: list[JoinSummary], keep_all: bool, images: int = 1
) -> tuple[pa.Table, int, Counter[str]]:
    """Every file's bad rows and every partition's duplicates, in (file, row) order: all of them
    (`keep_all`), else the first few. With `images` N, a duplicate is an image: its row is the
    manifest row (position // N), and the reason says which images."""
    uris = [scan.uri for scan in scans]
    tables = [
        scan.problems.append_column("_file", pa.array([scan.index] * scan.problems.num_rows, pa.int32()))
        for scan in scans
    ]
    for join in joined:
        if not join.duplicates.num_rows:
            continue
        d = join.duplicates.to_pydict()
        if images == 1:
            reasons = [
                f"duplicate id (first at file {uris[f]}, row {r})"
                for f, r in zip(d["first_file"], d["first_row"], strict=True)
            ]
        else:
            reasons = [_image_duplicate(uris[f], r, first, images) for r, f, first in zip(
                d["row"], d["first_file"], d["first_row"], strict=True
            )]  # fmt: skip
            d["row"] = [r // images for r in d["row"]]
        n = join.duplicates.num_rows
        tables.append(
            pa.table(
                {
                    "file": [uris[f] for f in d["file"]],
                    "row": pa.array(d["row"], pa.int64()),
                    "id": d["id"],
                    "column": ["id"] * n,
                    "reason": reasons,
                    "prompt": pa.nulls(n, pa.string()),
                    "seed": pa.nulls(n, pa.string()),
                    "_file": pa.array(d["file"], pa.int32()),
                },
            )
        )
    table = pa.concat_tables([t.cast(tables[0].schema) for t in tables]) if tables else PROBLEM_SCHEMA.empty_table()
    if table.num_rows:
        table = table.sort_by([("_file", "ascending"), ("row", "ascending")])
    table = table.drop_columns(["_file"]) if "_file" in table.column_names else table
    if not keep_all:
        table = table.slice(0, MAX_KEPT_PROBLEMS)
    columns: Counter[str] = Counter()
    for scan in scans:
        columns.update(scan.problem_columns)
    duplicates = sum(j.duplicate_count for j in joined)
    if duplicates:
        columns["duplicate id"] += duplicates
    return table, sum(scan.problem_count for scan in scans) + duplicates, columns

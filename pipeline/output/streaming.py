"""Passes over every part of an output in bounded memory: `verify`, `report` and `publish` at 100M rows.

A 100-million-row output has some 200,000 parts; its ids alone take gigabytes as Arrow and far
more as Python strings. These commands therefore read the parts in a thread pool (object stores
answer faster in parallel) that keeps only a window of parts in flight (`bounded_map`), and hold
O(parts) at most: a path per part, never a value per row. `verify` joins its ids on the cluster
(`output.checks`); the images a listing holds against the ones the metadata names (the files
layout's orphans) are spilled to local temporary Arrow IPC files split by image folder
(`PartitionedSpill`) and compared one folder group at a time, so memory is a group's worth
whatever the output's size. Temporary disk: a few GB per 100M rows of the files layout, under
`TMPDIR`.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.layout import IMAGES_DIR, SHARD_HEX_DIGITS

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

T = TypeVar("T")
R = TypeVar("R")

THREADS = 16  # parts (or images) read at once: object stores answer faster in parallel
FLUSH_ROWS = 1 << 18  # rows buffered before a spill splits and writes them
_IPC = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4") else None)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], *, threads: int = THREADS) -> Iterator[R]:
    """`map(fn, items)` on `threads` threads, results in order, with at most twice `threads`
    submitted and not yet consumed: a consumer slower than the readers never piles every part up
    in memory (as `ThreadPoolExecutor.map`, which submits everything at once, would)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error, or a consumer that stops early: drop what has not started
            for future in pending:
                future.cancel()


def read_columns(fs: AbstractFileSystem, path: str, columns: list[str]) -> pa.Table:
    """Some columns of one metadata part; a column the part lacks reads as nulls (strings)."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
    for name in columns:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table.select(columns)


class PartitionedSpill:
    """Tables appended in any order, split by partition into local Arrow IPC files under
    `directory`, then read back one partition at a time (after `close`).

    `partition_of_rows(table)` gives each row's partition (0 <= p < `partitions`). Appends are
    buffered to FLUSH_ROWS rows, so a part of a few rows does not become a batch per partition."""

    def __init__(
        self, directory: str, schema: pa.Schema, *, partitions: int, partition_of_rows: Callable[[pa.Table], np.ndarray]
    ):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.schema, self.partitions = directory, schema, partitions
        self._partition_of_rows = partition_of_rows
        self._writers: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def append(self, table: pa.Table) -> None:
        if table.num_rows:
            self._buffer.append(table.select(self.schema.names).cast(self.schema))
            self._buffered += table.num_rows
            if self._buffered >= FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered = [], 0
        parts = self._partition_of_rows(table)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self.partitions + 1))
        ordered = table.take(pa.array(order, pa.int64()))
        for p in np.flatnonzero(np.diff(bounds)):
            self._writer(int(p)).write_table(ordered.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])))

    def _writer(self, p: int) -> pa.ipc.RecordBatchStreamWriter:
        if p not in self._writers:
            sink = pa.OSFile(self._path(p), "wb")
            self._writers[p] = (sink, pa.ipc.new_stream(sink, self.schema, options=_IPC))
        return self._writers[p][1]

    def _path(self, p: int) -> str:
        return os.path.join(self.directory, f"{p:04d}.arrows")

    def close(self) -> None:
        self._flush()
        for sink, writer in self._writers.values():
            writer.close()
            sink.close()
        self._writers.clear()

    def read(self, p: int) -> pa.Table:
        """Every row of partition `p` (none: an empty table)."""
        if not os.path.exists(self._path(p)):
            return self.schema.empty_table()
        with pa.OSFile(self._path(p), "rb") as source:
            return pa.ipc.open_stream(source).read_all()


# The image folders of the files layout, `images/<2 hex digits>` (`layout.shard_of`): one
# partition each, and one more for any other path.
IMAGE_FOLDERS = pa.array([f"{IMAGES_DIR}/{i:0{SHARD_HEX_DIGITS}x}" for i in range(16**SHARD_HEX_DIGITS)], pa.string())
_PATH_SCHEMA = pa.schema([("path", pa.string())])
_FIRST_TWO = re.compile(r"^([^/]*/[^/]*)/.*$")


def image_folder(relpath: str) -> str:
    """The folder a listing finds an image in: the first two components of its path
    (`images/ab/key.png` -> `images/ab`), or its parent when it has fewer."""
    match = _FIRST_TWO.match(relpath)
    return match.group(1) if match else relpath.rpartition("/")[0]


def _image_folders(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`image_folder` of every path, vectorised."""
    first_two = pc.replace_substring_regex(paths, _FIRST_TWO.pattern, r"\1")
    parent = pc.replace_substring_regex(paths, r"(^|/)[^/]*$", "")
    return pc.if_else(pc.equal(first_two, paths), parent, first_two)


def folder_partition(folders: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The partition of each image folder: its index among IMAGE_FOLDERS, the last one for others."""
    index = pc.fill_null(pc.index_in(folders, value_set=IMAGE_FOLDERS), len(IMAGE_FOLDERS))
    return np.asarray(index.to_numpy(zero_copy_only=False), dtype=np.int64)


class ImageReferences:
    """The `image_path` of every committed row of the files layout, spilled by image folder, so
    that orphans are found one folder at a time: each folder's listing is compared with that
    folder's references only (`output.orphans`)."""

    def __init__(self, directory: str):
        self._spill = PartitionedSpill(
            directory,
            _PATH_SCHEMA,
            partitions=len(IMAGE_FOLDERS) + 1,
            partition_of_rows=lambda t: folder_partition(_image_folders(t.column("path"))),
        )

    def add(self, paths: pa.Array | pa.ChunkedArray) -> None:
        self._spill.append(pa.table({"path": pc.drop_null(paths)}))

    def close(self) -> None:
        self._spill.close()

    def by_partition(self, folders: list[str]) -> Iterator[tuple[list[str], pa.Array]]:
        """The listed `folders` by partition, each group with every path referenced in it."""
        parts = folder_partition(pa.array(folders, pa.string()))
        for p in np.unique(parts):
            group = [folder for folder, q in zip(folders, parts, strict=True) if q == p]
            yield group, self._spill.read(int(p)).column("path").combine_chunks()

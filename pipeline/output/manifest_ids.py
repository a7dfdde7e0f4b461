"""The ids of a manifest, streamed a row group at a time, for `verify --manifest`.

`verify` compares every manifest id with the output's. The planner (`plan.manifest`) collects the
ids of a whole manifest at once, which a 100M-row manifest makes gigabytes; this reader yields
them a row group at a time, read in parallel, in manifest order, so `verify` can spill them to its
partitions (`output.streaming`). Ids are those the job renders under: the `id` column, else
`derive_ids` of the file's path relative to the manifest root and the row's position, as planned.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import ManifestError
from pipeline.core.io import full_uri
from pipeline.output.streaming import bounded_map
from pipeline.plan.formats import AUTO
from pipeline.plan.manifest import check_schema, derive_ids, expand_ids, list_manifest_files, open_parquet

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig

# What pyarrow raises on a damaged file (as the planner sees it).
_DAMAGED = (pa.ArrowException, OSError, ValueError)


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest: `uri` as the planner (and rejects/) name it, its rows per
    row group, and whether it has its own `id` column."""

    uri: str
    path: str
    relpath: str
    row_groups: tuple[int, ...]
    has_id: bool
    format: str = AUTO  # the job's `manifest_format`

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class IdChunk:
    """The ids of one row group: `file` indexes the manifest's files, `row_offset` is the first
    row's position in its file."""

    file: int
    row_offset: int
    ids: pa.Array


def manifest_files(
    uri: str, storage: StorageConfig | None = None, manifest_format: str = AUTO
) -> tuple[AbstractFileSystem, list[ManifestFile]]:
    """Every file of the manifest with its row groups, from the footers (read in parallel); a
    file that is not a readable manifest raises a ManifestError naming it, as planning does.
    `manifest_format`: the job's (`auto`: by extension)."""
    fs, root, paths = list_manifest_files(uri, storage, manifest_format=manifest_format)

    def footer(path: str) -> ManifestFile:
        file_uri = full_uri(fs, path)
        with open_parquet(fs, path, file_uri, manifest_format) as parquet:  # any manifest format (`plan.formats`)
            schema, metadata = parquet.schema_arrow, parquet.metadata
        check_schema(schema, file_uri)
        groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        return ManifestFile(
            file_uri, path, posixpath.relpath(path, root), groups, "id" in schema.names, manifest_format
        )

    files = list(bounded_map(footer, paths))
    if not sum(f.rows for f in files):
        raise ManifestError(f"manifest {uri} has no rows")
    return fs, files


def manifest_ids(fs: AbstractFileSystem, files: list[ManifestFile], images: int = 1) -> Iterator[IdChunk]:
    """The ids of every row group of `files`, in order (files, then rows); with `images` N (the
    job's `images_per_prompt`), each row's N image ids (`plan.manifest.expand_ids`)."""
    tasks = []
    for index, file in enumerate(files):
        offset = 0
        for group, rows in enumerate(file.row_groups):
            tasks.append((index, group, offset, rows))
            offset += rows

    def read(task: tuple[int, int, int, int]) -> IdChunk:
        index, group, offset, rows = task
        file = files[index]
        if not file.has_id:
            return IdChunk(index, offset, expand_ids(derive_ids(file.relpath, offset, rows), images))
        try:
            with open_parquet(fs, file.path, file.uri, file.format) as parquet:
                column = parquet.read_row_group(group, columns=["id"]).column("id")
        except _DAMAGED as error:
            raise ManifestError(f"row group {group} is corrupt ({error})", file=file.uri) from None
        return IdChunk(index, offset, expand_ids(pc.cast(column, pa.string()), images))

    yield from bounded_map(read, (t for t in tasks if t[3]))

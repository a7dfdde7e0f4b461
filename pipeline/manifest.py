"""Reading and checking Parquet manifests of prompts and seeds.

Contract: `prompt` (string) and `seed` (integer, 0 <= seed < 2**63) are required; `id` (string)
is optional, and when absent a stable id is derived from the file's path relative to the
manifest root and the row's position, so the same manifest always yields the same ids.
Optional per-row settings: `negative_prompt`, `width`, `height`, `steps`, `guidance_scale`.
Every other column passes through unchanged into the output metadata.

The manifest is planned in one streaming pass that reads only the key columns, one row group at
a time, so the driver never holds the prompts of a large manifest; the Ray read stage later reads
each row group (a `Fragment`) in full.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ManifestError, StorageError
from pipeline.io import filesystem, full_uri

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.config import StorageConfig

SEED_LIMIT = 2**63
REQUIRED_COLUMNS = ("prompt", "seed")
OPTIONAL_COLUMNS = ("id", "negative_prompt", "width", "height", "steps", "guidance_scale")
# Columns the output metadata adds; a manifest column of the same name would be ambiguous.
RESERVED_COLUMNS = (
    "model",
    "scheduler",
    "weights",
    "peak_memory_mb",
    "image_path",
    "sha256",
    "bytes",
    "generation_seconds",
    "encode_seconds",
    "tar_member",
    "node",
    "actor",
    "pixels",
    "image",
)
_GLOB_CHARS = "*?["


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t))


def _is_integer(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_null(t))


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t))


_TYPE_CHECKS = {
    "prompt": (_is_string, "string"),
    "seed": (_is_integer, "integer"),
    "id": (_is_string, "string"),
    "negative_prompt": (_is_string, "string"),
    "width": (_is_integer, "integer"),
    "height": (_is_integer, "integer"),
    "steps": (_is_integer, "integer"),
    "guidance_scale": (_is_number, "number"),
}
# Normalised types, so that every fragment has the same schema whatever the source file used.
_TARGET_TYPES = {
    "id": pa.string(),
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "seed": pa.int64(),
    "width": pa.int32(),
    "height": pa.int32(),
    "steps": pa.int32(),
    "guidance_scale": pa.float64(),
}


@dataclass(frozen=True)
class Fragment:
    """A run of rows inside one row group of one manifest file: the unit the read stage loads.

    `row_offset` is the first row's position in the file (ids derive from it); `start` is its
    position inside the row group.
    """

    uri: str
    relpath: str
    row_group: int
    row_offset: int
    num_rows: int
    start: int = 0

    def split(self, rows: int) -> list[Fragment]:
        """Slices of at most `rows` rows, so that one large row group feeds many actors."""
        return [
            Fragment(
                self.uri,
                self.relpath,
                self.row_group,
                self.row_offset + s,
                min(rows, self.num_rows - s),
                self.start + s,
            )
            for s in range(0, self.num_rows, rows)
        ]


@dataclass
class ManifestPlan:
    """What a manifest holds, found without loading its prompts."""

    root: str
    files: list[str]
    fragments: list[Fragment]
    total_rows: int
    ids: pa.ChunkedArray = field(repr=False)


def _root_and_files(fs: AbstractFileSystem, path: str, uri: str) -> tuple[str, list[str]]:
    if any(ch in path for ch in _GLOB_CHARS):
        prefix = path.split("*")[0].split("?")[0].split("[")[0]
        root = prefix if prefix.endswith("/") else posixpath.dirname(prefix)
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        root = path
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(p, path))
    elif fs.isfile(path):
        root, files = posixpath.dirname(path), [path]
    else:
        raise ManifestError(f"manifest not found: {uri} (expected a Parquet file, a folder of them, or a glob)")
    if not files:
        raise ManifestError(f"manifest {uri} matches no Parquet files")
    return root, files


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_manifest_files(uri: str, storage: StorageConfig | None = None) -> tuple[AbstractFileSystem, str, list[str]]:
    """Resolve a manifest URI (file, folder or glob) to its root and sorted Parquet files."""
    fs, path = filesystem(uri, storage)
    try:
        root, files = _root_and_files(fs, path, uri)
    except ManifestError:
        raise
    except PermissionError as error:
        raise StorageError(f"no permission to read the manifest {uri}: {error}") from None
    except Exception as error:  # botocore's credential and bucket errors are not OSErrors
        raise StorageError(f"cannot list the manifest {uri}: {type(error).__name__}: {error}") from None
    return fs, root, files


def check_schema(schema: pa.Schema, uri: str) -> None:
    """Raise a ManifestError naming the file and column if a known column is missing or mistyped."""
    names = set(schema.names)
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ManifestError(
                f"required column is missing (found columns: {', '.join(schema.names) or 'none'}); "
                f"a manifest needs 'prompt' (string) and 'seed' (integer)",
                file=uri,
                column=column,
            )
    for column, (check, expected) in _TYPE_CHECKS.items():
        if column in names and not check(schema.field(column).type):
            raise ManifestError(
                f"expected {expected} values, found {schema.field(column).type}; convert the column",
                file=uri,
                column=column,
            )
    for column in RESERVED_COLUMNS:
        if column in names:
            raise ManifestError("this name is reserved for output metadata; rename the column", file=uri, column=column)


def derive_ids(relpath: str, row_offset: int, num_rows: int) -> pa.Array:
    """Stable ids for a manifest without an `id` column: `<file path without .parquet>-<row>`."""
    stem = relpath[: -len(".parquet")] if relpath.endswith(".parquet") else relpath
    stem = stem.replace("/", "__")
    return pa.array([f"{stem}-{row:09d}" for row in range(row_offset, row_offset + num_rows)], pa.string())


def _first_bad_row(mask: pa.Array | pa.ChunkedArray) -> int | None:
    indices = pc.indices_nonzero(pc.fill_null(mask, True))
    return int(indices[0].as_py()) if len(indices) else None


def check_rows(table: pa.Table, fragment: Fragment) -> None:
    """Raise a ManifestError for the first row that breaks the contract (row numbers count from 0)."""
    checks: list[tuple[str, pa.Array | pa.ChunkedArray, str]] = []
    prompt = table.column("prompt")
    checks.append(
        ("prompt", pc.or_(pc.is_null(prompt), pc.equal(pc.utf8_length(prompt), 0)), "prompt is null or empty")
    )
    seed = table.column("seed")
    checks.append(("seed", pc.is_null(seed), "seed is null"))
    if pa.types.is_unsigned_integer(seed.type):
        # Only uint64 can exceed 2**63 - 1; signed integers fit by construction.
        if pa.types.is_uint64(seed.type):
            checks.append(("seed", pc.greater_equal(seed, pa.scalar(SEED_LIMIT, pa.uint64())), "seed must be < 2**63"))
    elif pa.types.is_integer(seed.type):
        checks.append(("seed", pc.less(seed, 0), "seed must satisfy 0 <= seed < 2**63"))
    if "id" in table.column_names:
        ids = table.column("id")
        checks.append(("id", pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0)), "id is null or empty"))
    for column, mask, message in checks:
        row = _first_bad_row(mask)
        if row is not None:
            raise ManifestError(
                f"{message}; fix or remove the row", file=fragment.uri, row=fragment.row_offset + row, column=column
            )


@contextmanager
def _open_parquet(fs: AbstractFileSystem, path: str, uri: str) -> Iterator[pq.ParquetFile]:
    """Open a Parquet file for reading, closing it after use (manifests may have thousands)."""
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise ManifestError("file disappeared while reading; rerun the job", file=uri) from None
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise ManifestError(f"not a readable Parquet file ({error}); re-export it", file=uri) from None
        yield parquet


def _read_row_group(parquet: pq.ParquetFile, fragment: Fragment, columns: list[str] | None = None) -> pa.Table:
    try:
        table = _slice(parquet.read_row_group(fragment.row_group, columns=columns), fragment)
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(f"row group {fragment.row_group} is corrupt ({error})", file=fragment.uri) from None
    check_rows(table, fragment)
    return table


def normalize(table: pa.Table, fragment: Fragment) -> pa.Table:
    """Give a fragment the canonical schema: `id` first, known columns cast, pass-through columns kept."""
    if "id" not in table.column_names:
        table = table.add_column(0, "id", derive_ids(fragment.relpath, fragment.row_offset, table.num_rows))
    columns, names = [], []
    for name in ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale"):
        if name in table.column_names:
            columns.append(pc.cast(table.column(name), _TARGET_TYPES[name]))
        else:
            columns.append(pa.nulls(table.num_rows, _TARGET_TYPES[name]))
        names.append(name)
    for name in table.column_names:
        if name not in names:
            columns.append(table.column(name))
            names.append(name)
    return pa.table(columns, names=names)


def read_fragment(fragment: Fragment, storage: StorageConfig | None = None) -> pa.Table:
    """Read, check and normalise one row group of a manifest file."""
    fs, path = filesystem(fragment.uri, storage)
    with _open_parquet(fs, path, fragment.uri) as parquet:
        return normalize(_read_row_group(parquet, fragment), fragment)


def _slice(table: pa.Table, fragment: Fragment) -> pa.Table:
    return (
        table
        if fragment.start == 0 and table.num_rows == fragment.num_rows
        else table.slice(fragment.start, fragment.num_rows)
    )


def plan_manifest(uri: str, storage: StorageConfig | None = None) -> ManifestPlan:
    """Find every file and row group, check schemas and rows, and collect the ids.

    Only `id`, `prompt` and `seed` are read, a row group at a time, so this streams.
    Raises ManifestError on the first structural or row problem and on duplicate ids.
    """
    fs, root, files = list_manifest_files(uri, storage)
    fragments: list[Fragment] = []
    id_chunks: list[pa.Array] = []
    for path in files:
        file_uri = full_uri(fs, path)
        relpath = posixpath.relpath(path, root)
        with _open_parquet(fs, path, file_uri) as parquet:
            check_schema(parquet.schema_arrow, file_uri)
            key_columns = [c for c in ("id", "prompt", "seed") if c in parquet.schema_arrow.names]
            offset = 0
            for index in range(parquet.metadata.num_row_groups):
                num_rows = parquet.metadata.row_group(index).num_rows
                fragment = Fragment(file_uri, relpath, index, offset, num_rows)
                table = _read_row_group(parquet, fragment, key_columns)
                ids = table.column("id") if "id" in table.column_names else derive_ids(relpath, offset, num_rows)
                id_chunks.extend(pc.cast(ids, pa.string()).chunks if isinstance(ids, pa.ChunkedArray) else [ids])
                if num_rows:
                    fragments.append(fragment)
                offset += num_rows
    ids = pa.chunked_array(id_chunks, pa.string())
    if len(ids) == 0:
        raise ManifestError(f"manifest {uri} has no rows")
    _check_unique(ids)
    return ManifestPlan(
        root=full_uri(fs, root),
        files=[full_uri(fs, f) for f in files],
        fragments=fragments,
        total_rows=len(ids),
        ids=ids,
    )


def _check_unique(ids: pa.ChunkedArray) -> None:
    counts = pc.value_counts(ids)
    duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        sample = ", ".join(repr(v) for v in duplicated[:5].to_pylist())
        raise ManifestError(
            f"{len(duplicated)} id(s) appear more than once (e.g. {sample}); ids must be unique across the manifest",
            column="id",
        )

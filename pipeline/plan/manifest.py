"""Reading and checking manifests of prompts (Parquet, or any format of `plan.formats`).

Contract: `prompt` (string) is required; `seed` (integer, 0 <= seed < 2**63) is optional, and when
absent each row's seed derives from its id (`derive_seeds`); `id` (string) is optional, and when
absent a stable id is derived from the file's path relative to the manifest root and the row's
position, so the same manifest always yields the same ids. Optional per-row settings:
`negative_prompt`, `width`, `height`, `steps`, `guidance_scale`. Every other column passes through
unchanged into the output metadata. With `images_per_prompt` N, each row is N images with ids
and seeds of their own (`image_ids`, `image_seeds`).

Integer columns may also be stored as floats with integral values (pandas writes nullable
integers that way).

Planning (`plan.rows`) reads only the key and setting columns, one row group at a time, in a task
per file, and checks every row (`row_problems`) and every id's uniqueness; the caller decides
whether bad rows stop the job or are skipped (`on_bad_row`). The Ray read stage later reads each
row group with rows to render (a `Fragment`) in full.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import ManifestError, StorageError
from pipeline.core.io import STORAGE_ERRORS, filesystem
from pipeline.plan.formats import (
    AUTO,
    FORMAT_NAMES,
    TableFile,
    extensions,
    in_folder,
    label,
    manifest_format,
    read_as,
    read_table_file,
    strip_format_suffix,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig
    from pipeline.models.presets import Preset

SEED_LIMIT = 2**63
REQUIRED_COLUMNS = ("prompt",)  # a row's seed, when the manifest has none, derives from its id
OPTIONAL_COLUMNS = ("id", "negative_prompt", "width", "height", "steps", "guidance_scale")
# A read slice's own columns, in order; the pass-through columns follow (plan.schema).
COLUMNS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale")
# Columns the output metadata adds; a manifest column of the same name would be ambiguous.
RESERVED_COLUMNS = (
    "model",
    "scheduler",
    "weights",
    "peak_memory_mb",
    "prompt_tokens",
    "prompt_truncated",
    "negative_prompt_truncated",
    "render_batch_size",
    "oom_retries",
    "image_path",
    "sha256",
    "bytes",
    "generation_seconds",
    "encode_seconds",
    "tar_member",
    "node",
    "actor",
    "accelerator_type",
    "dtype",
    "vae",
    "attention",
    "pixels",
    "image",
    "key",
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
    "seed": (_is_number, "integer"),
    "id": (_is_string, "string"),
    "negative_prompt": (_is_string, "string"),
    "width": (_is_number, "integer"),
    "height": (_is_number, "integer"),
    "steps": (_is_number, "integer"),
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
    position inside the row group. `format`: the job's `manifest_format` (`auto`: the file is read
    by its extension, `plan.formats`); `images`: the job's `images_per_prompt`, each row read as that many images
    (`image_ids`). Both travel with the read tasks, so the read stage needs no other setting.
    """

    uri: str
    relpath: str
    row_group: int
    row_offset: int
    num_rows: int
    start: int = 0
    format: str = AUTO
    images: int = 1


def _root_and_files(
    fs: AbstractFileSystem, path: str, uri: str, chosen: str = AUTO
) -> tuple[str, list[str], dict[str, dict[str, Any]]]:
    """The manifest's root, its files in name order, and the listing's entry of each. `chosen`:
    the job's `manifest_format` (which of a folder's files are manifests: `formats.in_folder`)."""
    if any(ch in path for ch in _GLOB_CHARS):
        prefix = path.split("*")[0].split("?")[0].split("[")[0]
        root = prefix if prefix.endswith("/") else posixpath.dirname(prefix)
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
    elif fs.isdir(path):
        root = path
        listing = fs.find(path, detail=True)
        if any(posixpath.relpath(p, path) == "dataset_dict.json" for p in listing):
            splits = sorted(
                {posixpath.relpath(p, path).split("/")[0] for p in listing if "/" in posixpath.relpath(p, path)}
            )
            raise ManifestError(
                f"manifest {uri} is a `datasets` DatasetDict folder (its splits: {', '.join(splits) or 'none'}): point "
                f"the manifest at one split's folder, e.g. {uri.rstrip('/')}/{splits[0] if splits else 'train'}"
            )
        found = {
            p: info
            for p, info in listing.items()
            if in_folder(p, chosen) and not _hidden(p, path) and info.get("type") == "file"
        }
        if chosen == AUTO:
            found = _one_format(found)
    elif fs.isfile(path):
        root, found = posixpath.dirname(path), {path: fs.info(path)}
    else:
        raise ManifestError(f"manifest not found: {uri} (expected a manifest file, a folder of them, or a glob)")
    if not found and chosen != AUTO:
        raise ManifestError(
            f"manifest {uri} matches no {label(chosen)} files (manifest_format: {chosen}: in a folder, the files "
            f"named {extensions(chosen)} or without an extension; a glob such as {uri.rstrip('/')}/*.txt takes "
            "other names)"
        )
    if not found:
        raise ManifestError(f"manifest {uri} matches no manifest files ({FORMAT_NAMES})")
    return root, sorted(found), found


def _one_format(found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A folder's manifest files: its Parquet files if it has any, else its Arrow files (a
    `datasets` folder), else its files of the other formats; a README.txt or notes.json beside
    Parquet files is not read as prompts."""
    for kind in ("parquet", "arrow"):
        chosen = {p: info for p, info in found.items() if manifest_format(p) == kind}
        if chosen:
            return chosen
    return found


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith((".", "_")) for part in rel.split("/"))


@overload
def list_manifest_files(
    uri: str, storage: StorageConfig | None = None, *, sizes: Literal[False] = False, manifest_format: str = AUTO
) -> tuple[AbstractFileSystem, str, list[str]]: ...
@overload
def list_manifest_files(
    uri: str, storage: StorageConfig | None = None, *, sizes: Literal[True], manifest_format: str = AUTO
) -> tuple[AbstractFileSystem, str, list[str], list[int]]: ...
def list_manifest_files(
    uri: str, storage: StorageConfig | None = None, *, sizes: bool = False, manifest_format: str = AUTO
) -> Any:
    """Resolve a manifest URI (file, folder or glob) to its root and sorted manifest files (and,
    with `sizes`, their sizes in bytes, from the same listing). `manifest_format`: the job's
    (`auto`: by extension), which decides which of a folder's files are manifests."""
    fs, path = filesystem(uri, storage)
    try:
        root, files, found = _root_and_files(fs, path, uri, manifest_format)
    except ManifestError:
        raise
    except PermissionError as error:
        raise StorageError(f"no permission to read the manifest {uri}: {error}") from error
    except STORAGE_ERRORS as error:  # botocore's credential and bucket errors are not OSErrors
        raise StorageError(f"cannot list the manifest {uri}: {type(error).__name__}: {error}") from error
    if sizes:
        return fs, root, files, [int(found[f].get("size") or 0) for f in files]
    return fs, root, files


def check_schema(schema: pa.Schema, uri: str, how: str = "") -> None:
    """Raise a ManifestError naming the file and column if a known column is missing or mistyped;
    `how`: the format the file was read in and why (`formats.read_as`), said where the columns
    found suggest another format."""
    names = set(schema.names)
    for column, times in Counter(schema.names).items():
        if times > 1:
            raise ManifestError(
                f"this column name appears {times} times; give each column its own name", file=uri, column=column
            )
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ManifestError(
                f"required column is missing (found columns: {', '.join(schema.names) or 'none'}); "
                f"a manifest needs 'prompt' (string); 'seed' (integer) and 'id' (string) are optional"
                + (f" (read as {how})" if how else ""),
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
    """Stable ids for a manifest without an `id` column: `<file path without its extension>-<row>`."""
    stem = strip_format_suffix(relpath).replace("/", "__")
    return pa.array([f"{stem}-{row:09d}" for row in range(row_offset, row_offset + num_rows)], pa.string())


# `images_per_prompt`: a manifest row renders N images. Image 0 is the row itself: its id and its
# seed, so that N = 1 is exactly the manifest and raising N keeps every image already rendered.
# Image k >= 1 has the id `<id>-<k>` and the seed `(seed + k) mod 2**63`: neither depends on N, so
# an image is the same whatever N a run used, and N is not part of the settings fingerprint
# (`plan.ledger`). Splitting at the last `-` gives back the row's id and k, so two images of the
# manifest's rows never share an id; a manifest id equal to a derived one (rows `cat` and `cat-1`
# with N >= 2) is found by the planner's duplicate-id check, which keeps the manifest's own id (image
# 0) and reports the derived one (`plan.rows._duplicates`).


def manifest_reading(record: dict[str, Any] | None) -> tuple[str, int]:
    """How the job that wrote an output read its manifest, from the output's `job.json` record:
    (`manifest_format`, `images_per_prompt`); an output of an earlier version: (`auto`, 1).
    `verify --manifest` reads the manifest so, to know which ids the job was to render."""
    config = (record or {}).get("config") or {}
    return str(config.get("manifest_format") or AUTO), int(config.get("images_per_prompt") or 1)


def image_ids(ids: pa.Array | pa.ChunkedArray, image: np.ndarray) -> pa.Array:
    """The ids of images: `ids[i]` for image 0, `f"{ids[i]}-{image[i]}"` for the others."""
    ids = pc.cast(ids, pa.string())
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if not len(image) or not image.any():
        return ids
    suffixes = pa.array([""] + [f"-{k}" for k in range(1, int(image.max()) + 1)], pa.string())
    return pc.binary_join_element_wise(ids, pc.take(suffixes, pa.array(image, pa.int64())), "")


def expand_ids(ids: pa.Array | pa.ChunkedArray, images: int) -> pa.Array:
    """Every image's id, row by row: `id`, `id-1`, ..., `id-<images - 1>` (`verify --manifest`)."""
    if images == 1:
        ids = pc.cast(ids, pa.string())
        return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), images)
    return image_ids(pc.take(ids, pa.array(rows)), np.tile(np.arange(images, dtype=np.int64), len(ids)))


def expand_rows(rows: np.ndarray, images: int) -> np.ndarray:
    """Each row's images, by position (row * images + k), row by row (what the pending masks index)."""
    rows = np.asarray(rows, dtype=np.int64)
    if images == 1:
        return rows
    return (rows[:, None] * images + np.arange(images, dtype=np.int64)).reshape(-1)


def image_seeds(seeds: pa.Array | pa.ChunkedArray, image: np.ndarray) -> pa.Array:
    """The seeds of images (int64, each `0 <= seed < 2**63`): `(seed + k) mod 2**63` for image k."""
    seeds = pc.cast(seeds, pa.int64())
    values = np.asarray(pc.fill_null(seeds, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    shifted = (values.astype(np.uint64) + np.asarray(image, dtype=np.uint64)) & np.uint64(SEED_LIMIT - 1)
    nulls = np.asarray(pc.is_null(seeds).to_numpy(zero_copy_only=False), dtype=bool)
    return pa.array(shifted.astype(np.int64), pa.int64(), mask=nulls if nulls.any() else None)


@dataclass(frozen=True)
class RowRules:
    """Limits for the values a row sets itself (a null setting takes the job's default, which the
    config check covers). `size_range` bounds width and height, both multiples of 8."""

    model: str = "any"
    steps_range: tuple[int, int] = (1, 1000)
    guidance_range: tuple[float, float] = (0.0, 100.0)
    size_range: tuple[int, int] = (8, 16384)
    reason: str = ""


GENERIC_RULES = RowRules()


def rules_for(preset: Preset) -> RowRules:
    return RowRules(
        model=preset.name,
        steps_range=preset.steps_range,
        guidance_range=preset.guidance_range,
        size_range=preset.size_range,
        reason=preset.limits_reason,
    )


MAX_PROMPT_CHARS = 200  # prompt text kept in rejects/ and error messages


def _bools(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A compute result as a numpy bool array, nulls counted as False."""
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Numeric values as float64 (nulls as NaN) for range checks. Integers past 2**53 round to
    the nearest float (a strict cast would raise), far outside every range checked."""
    if pa.types.is_null(column.type):
        return np.full(len(column), np.nan)
    values = pc.cast(column, pa.float64(), safe=False)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _present(column: pa.ChunkedArray) -> np.ndarray:
    """Non-null values: a NaN is present (and not a valid number), unlike a null."""
    return _bools(pc.is_valid(column))


def _text_problems(table: pa.Table, name: str, what: str) -> list[tuple[str, np.ndarray, str]]:
    column = table.column(name)
    if pa.types.is_null(column.type):
        return [(name, np.ones(table.num_rows, dtype=bool), f"{what} is missing (null)")]
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return [
        (name, _bools(pc.is_null(column)), f"{what} is missing (null)"),
        (name, _bools(empty), f"{what} is empty"),
    ]


def _seed_problems(column: pa.ChunkedArray, n: int) -> list[tuple[str, np.ndarray, str]]:
    if pa.types.is_null(column.type):
        return [("seed", np.ones(n, dtype=bool), "seed is missing (null)")]
    out = [("seed", _bools(pc.is_null(column)), "seed is missing (null)")]
    out_of_range = "seed is out of range: it must satisfy 0 <= seed < 2**63"
    if pa.types.is_floating(column.type):
        values = _floats(column)
        with np.errstate(invalid="ignore"):
            out.append(
                (
                    "seed",
                    _present(column) & ((values != np.floor(values)) | ~np.isfinite(values)),
                    "seed is not an integer",
                )
            )
            out.append(("seed", (values < 0) | (values >= float(SEED_LIMIT)), out_of_range))
    elif pa.types.is_uint64(column.type):
        out.append(("seed", _bools(pc.greater_equal(column, pa.scalar(SEED_LIMIT, pa.uint64()))), out_of_range))
    elif pa.types.is_signed_integer(column.type):
        out.append(("seed", _bools(pc.less(column, 0)), out_of_range))
    return out


def _setting_problems(table: pa.Table, rules: RowRules) -> list[tuple[str, np.ndarray, str]]:
    out: list[tuple[str, np.ndarray, str]] = []
    why = f": {rules.reason}" if rules.reason else ""
    low, high = rules.size_range
    for name in ("width", "height", "steps"):
        if name not in table.column_names:
            continue
        values = _floats(table.column(name))
        present = _present(table.column(name))
        with np.errstate(invalid="ignore"):
            out.append(
                (name, present & ((values != np.floor(values)) | ~np.isfinite(values)), f"{name} is not an integer")
            )
            if name == "steps":
                s_low, s_high = rules.steps_range
                allowed = str(s_low) if s_low == s_high else f"{s_low} to {s_high}"
                out.append(
                    (
                        name,
                        present & ((values < s_low) | (values > s_high)),
                        f"model {rules.model} takes {allowed} steps{why}",
                    )
                )
            else:
                out.append((name, present & (np.mod(values, 8) != 0), f"{name} must be a multiple of 8"))
                out.append(
                    (
                        name,
                        present & ((values < low) | (values > high)),
                        f"model {rules.model} renders {name}s from {low} to {high} px",
                    )
                )
    if "guidance_scale" in table.column_names:
        values = _floats(table.column("guidance_scale"))
        g_low, g_high = rules.guidance_range
        with np.errstate(invalid="ignore"):
            bad = _present(table.column("guidance_scale")) & ~((values >= g_low) & (values <= g_high))
        out.append(("guidance_scale", bad, f"model {rules.model} takes guidance {g_low:g} to {g_high:g}{why}"))
    return out


def row_problems(table: pa.Table, rules: RowRules = GENERIC_RULES) -> tuple[np.ndarray, list[str], list[str]]:
    """The rows of `table` that break the contract: (row indices, column, reason), first problem
    of each row only, in row order. Vectorised: a million rows take well under a second."""
    n = table.num_rows
    checks = _text_problems(table, "prompt", "prompt") + _seed_problems(table.column("seed"), n)
    if "id" in table.column_names:
        checks += _text_problems(table, "id", "id")
    checks += _setting_problems(table, rules)
    flagged = np.zeros(n, dtype=bool)
    column_of = np.full(n, -1, dtype=np.int64)
    for index, (_, mask, _) in enumerate(checks):
        new = mask & ~flagged
        column_of[new] = index
        flagged |= new
    rows = np.flatnonzero(flagged)
    columns: list[str] = [""] * len(rows)
    reasons: list[str] = [""] * len(rows)
    for index in np.unique(column_of[rows]):
        name, _, reason = checks[index]
        where = np.flatnonzero(column_of[rows] == index)
        values = pc.take(table.column(name), pa.array(rows[where])).to_pylist()
        for position, value in zip(where, values, strict=True):
            columns[position] = name
            reasons[position] = reason if value is None or value == "" else f"{reason} (got {_short(value)})"
    return rows, columns, reasons


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What pyarrow raises on a damaged file: ArrowInvalid and its siblings, OSError for I/O and Thrift
# errors, UnicodeDecodeError (a ValueError) for a column name garbled in the footer.
_DAMAGED = (pa.ArrowException, OSError, ValueError)


@contextmanager
def open_parquet(
    fs: AbstractFileSystem, path: str, uri: str, manifest_format: str = AUTO
) -> Iterator[pq.ParquetFile | TableFile]:
    """Open a manifest file for reading, closing it after use (manifests may have thousands):
    Parquet read a row group at a time, any other format whole (`plan.formats`). `manifest_format`:
    the job's (`auto`: by the file's extension). A file its format cannot read is a ManifestError
    naming the file, the format tried and how it was chosen."""
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise ManifestError("file disappeared while reading; rerun the job", file=uri) from None
    kind, how = read_as(path, manifest_format)
    with handle:
        if kind != "parquet":
            yield read_table_file(handle, kind, uri, how)
            return
        try:
            parquet = pq.ParquetFile(handle)
        except _DAMAGED as error:
            raise ManifestError(
                f"not a readable Parquet file ({error}); re-export it, or check its format ({how})", file=uri
            ) from None
        yield parquet


def format_hint(path: str, manifest_format: str = AUTO) -> str:
    """How a file is read, for `check_schema`'s message when its columns look like another format's."""
    kind, how = read_as(path, manifest_format)
    return f"{label(kind)}, {how}"


def read_row_group(
    parquet: pq.ParquetFile | TableFile, fragment: Fragment, columns: list[str] | None = None
) -> pa.Table:
    """One row group's rows of `fragment`; a manifest without seeds gets each row's seed derived
    from its id (`derive_seeds`), so every later step sees a `seed` column."""
    names = parquet.schema_arrow.names
    derive = "seed" not in names
    wanted = columns if columns is None or not derive or "id" in columns or "id" not in names else [*columns, "id"]
    try:
        table = _slice(parquet.read_row_group(fragment.row_group, columns=wanted), fragment)
    except _DAMAGED as error:
        raise ManifestError(f"row group {fragment.row_group} is corrupt ({error})", file=fragment.uri) from None
    _check_values(table, fragment)
    if derive:
        ids = table.column("id") if "id" in table.column_names else None
        if ids is None:
            ids = derive_ids(fragment.relpath, fragment.row_offset, table.num_rows)
        table = table.append_column("seed", derive_seeds(ids))
        if wanted is not columns:
            table = table.drop_columns(["id"])
    return table


def derive_seeds(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each row's seed from its id, for a manifest without seeds: the first 8 bytes of the id's
    BLAKE2b digest, below 2**63: the same in every run and on every machine (a resume renders a
    row exactly as the first run would have); a null id gets a null seed (a bad row)."""
    seeds = [
        None if value is None else int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest()) >> 1
        for value in ids.to_pylist()
    ]
    return pa.array(seeds, pa.int64())


def _check_values(table: pa.Table, fragment: Fragment) -> None:
    """Parquet readers do not check that text columns hold UTF-8: a file written with another
    encoding (or damaged) would otherwise fail later, far from its cause, or in a worker."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as error:
            row = _first_non_utf8(column)
            if row is None:
                raise ManifestError(
                    f"row group {fragment.row_group} holds invalid values ({error}); re-export the file",
                    file=fragment.uri,
                    column=name,
                ) from None
            raise ManifestError(
                "text is not valid UTF-8; re-export the file with its text encoded as UTF-8",
                file=fragment.uri,
                row=fragment.row_offset + row,
                column=name,
            ) from None


def _first_non_utf8(column: pa.ChunkedArray) -> int | None:
    """Position of the first value of a string column that is not UTF-8 (None if there is none)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    for position, value in enumerate(pc.cast(column, pa.large_binary()).to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return position
    return None


def normalize(table: pa.Table, fragment: Fragment) -> pa.Table:
    """Give a fragment the canonical schema: `id` first, known columns cast, pass-through columns kept."""
    if "id" not in table.column_names:
        table = table.add_column(0, "id", derive_ids(fragment.relpath, fragment.row_offset, table.num_rows))
    columns, names = [], []
    for name in COLUMNS:
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


def read_fragment(
    fragment: Fragment,
    storage: StorageConfig | None = None,
    *,
    rules: RowRules = GENERIC_RULES,
    reject: list[int] | None = None,
) -> pa.Table:
    """Read, check and normalise one slice of a manifest file, without its `reject`ed images
    (indices inside the slice: rows, or with `fragment.images` N, row * N + k for image k). The
    images left must pass the checks that planning applied: if one does not, the file changed after
    planning, and the job stops naming the row. Image k of a row gets its id and seed (`image_ids`)."""
    fs, path = filesystem(fragment.uri, storage)
    with open_parquet(fs, path, fragment.uri, fragment.format) as parquet:
        table = read_row_group(parquet, fragment)
    if "id" not in table.column_names:  # derived from positions, so before any row is dropped
        table = table.add_column(0, "id", derive_ids(fragment.relpath, fragment.row_offset, table.num_rows))
    images = fragment.images
    positions = np.arange(table.num_rows * images)
    if reject:
        positions = np.setdiff1d(positions, np.asarray(reject, dtype=np.int64))
    if reject or images > 1:
        table = table.take(pa.array(positions // images, pa.int64()))
    bad, columns, reasons = row_problems(table, rules)  # the rows' own values, before images derive theirs
    if len(bad):
        raise ManifestError(
            f"{reasons[0]} (the file changed after the job was planned; rerun the job to re-validate it)",
            file=fragment.uri,
            row=fragment.row_offset + int(positions[bad[0]]) // images,
            column=columns[0],
        )
    table = normalize(table, fragment)
    if images > 1:
        image = positions % images
        table = table.set_column(0, "id", image_ids(table.column("id"), image))
        index = table.schema.get_field_index("seed")
        table = table.set_column(index, "seed", image_seeds(table.column("seed"), image))
    return table


def _slice(table: pa.Table, fragment: Fragment) -> pa.Table:
    return (
        table
        if fragment.start == 0 and table.num_rows == fragment.num_rows
        else table.slice(fragment.start, fragment.num_rows)
    )


SETTING_COLUMNS = ("width", "height", "steps", "guidance_scale")
PROBLEM_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("row", pa.int64()),
    ("id", pa.string()),
    ("column", pa.string()),
    ("reason", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.string()),
])  # fmt: skip
MAX_KEPT_PROBLEMS = 20  # problems kept in detail when they are only reported, not skipped


class Problems:
    """Collects bad rows chunk by chunk; keeps all, or only the first few, in detail."""

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self.chunks: list[pa.Table] = []
        self.kept = 0
        self.count = 0
        self.by_column: Counter[str] = Counter()

    def add(self, file: str, rows: np.ndarray, ids: list[Any], columns: list[str], reasons: list[str],
            prompts: list[Any], seeds: list[Any]) -> None:  # fmt: skip
        self.count += len(rows)
        self.by_column.update(
            "duplicate id" if r.startswith("duplicate id") else c for c, r in zip(columns, reasons, strict=True)
        )
        take = len(rows) if self.keep_all else max(0, min(len(rows), MAX_KEPT_PROBLEMS - self.kept))
        if not take:
            return
        self.kept += take
        self.chunks.append(pa.table([
            pa.array([file] * take, pa.string()),
            pa.array(rows[:take], pa.int64()),
            pa.array([None if i is None else str(i) for i in ids[:take]], pa.string()),
            pa.array(columns[:take], pa.string()),
            pa.array(reasons[:take], pa.string()),
            pa.array([None if p is None else str(p)[:MAX_PROMPT_CHARS] for p in prompts[:take]], pa.string()),
            pa.array([None if v is None else str(v) for v in seeds[:take]], pa.string()),
        ], schema=PROBLEM_SCHEMA))  # fmt: skip

    def table(self) -> pa.Table:
        return pa.concat_tables(self.chunks) if self.chunks else PROBLEM_SCHEMA.empty_table()

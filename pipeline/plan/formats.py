"""Manifest files in the formats people keep prompts in, offered to the planner as Parquet is.

Parquet is read a row group at a time from its footer. The other formats have no footer: a file
is read whole with pyarrow's own readers (CSV and TSV with `pyarrow.csv`, JSON Lines with
`pyarrow.json`, a JSON array of objects with the standard library, plain text one prompt per line,
and the Arrow files of a Hugging Face `datasets` folder saved with `save_to_disk`), then offered
in row groups of ROWS_PER_GROUP rows (`TableFile`), so that planning, validation, ids and resume
are the same code for every format. Each read of such a file reads it whole: split a text
manifest of many millions of rows into several files (or convert it to Parquet) so that its row
groups are read by several tasks.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

from pipeline.core.errors import ManifestError

ROWS_PER_GROUP = 1 << 20
FORMATS = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".txt": "text", ".arrow": "arrow",
}  # fmt: skip
# The metadata files a `datasets` folder holds beside its Arrow files: not manifests.
DATASETS_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
FORMAT_NAMES = "Parquet, CSV, TSV, JSON Lines, JSON, text or Arrow (a `datasets` folder)"
_TEXT_COLUMNS = ("id", "prompt", "negative_prompt")


def manifest_format(path: str) -> str | None:
    """The format a manifest file is read in, by its extension (None: not a manifest file)."""
    name = posixpath.basename(path)
    if name in DATASETS_METADATA:
        return None
    return FORMATS.get(posixpath.splitext(name)[1].lower())


def strip_format_suffix(relpath: str) -> str:
    """`relpath` without its manifest extension (ids derive from it)."""
    stem, suffix = posixpath.splitext(relpath)
    return stem if suffix.lower() in FORMATS else relpath


@dataclass(frozen=True)
class _RowGroup:
    num_rows: int


class _Metadata:
    def __init__(self, rows: int):
        self.num_rows = rows
        self._groups = [min(ROWS_PER_GROUP, rows - start) for start in range(0, rows, ROWS_PER_GROUP)] or [0]

    @property
    def num_row_groups(self) -> int:
        return len(self._groups)

    def row_group(self, index: int) -> _RowGroup:
        return _RowGroup(self._groups[index])


class TableFile:
    """A whole non-Parquet manifest file, with the part of `pyarrow.parquet.ParquetFile`'s interface
    the planner uses: `schema_arrow`, `metadata` (row groups of ROWS_PER_GROUP rows) and
    `read_row_group`."""

    def __init__(self, table: pa.Table):
        self._table = table
        self.schema_arrow = table.schema
        self.metadata = _Metadata(table.num_rows)

    def read_row_group(self, index: int, columns: list[str] | None = None) -> pa.Table:
        table = self._table.slice(index * ROWS_PER_GROUP, ROWS_PER_GROUP)
        return table if columns is None else table.select([c for c in columns if c in table.column_names])


def read_table_file(handle: IO[bytes], kind: str, uri: str) -> TableFile:
    """Read a non-Parquet manifest file whole; a file its format cannot read is a ManifestError
    naming it and saying what was expected."""
    try:
        table = _read(handle, kind)
    except ManifestError:
        raise
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as error:
        raise ManifestError(
            f"not a readable {kind} file ({str(error).splitlines()[0][:300]}); check its format", file=uri
        ) from None
    for name in _TEXT_COLUMNS:  # ids written as numbers, prompts read by type inference: text
        if name in table.column_names and pa.types.is_integer(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.string()))
    return TableFile(table)


def _read(handle: IO[bytes], kind: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    if kind in ("csv", "tsv"):
        return pcsv.read_csv(
            handle,
            parse_options=pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in ("prompt", "negative_prompt")}, strings_can_be_null=True
            ),
        )
    if kind == "jsonl":
        return pjson.read_json(handle)
    if kind == "json":
        rows: Any = json.load(io.TextIOWrapper(handle, encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError("expected a JSON array of objects, one per row")
        return pa.Table.from_pylist(rows)
    if kind == "text":  # one prompt per line; blank lines are skipped
        lines = handle.read().decode("utf-8").splitlines()
        return pa.table({"prompt": pa.array([line for line in lines if line.strip()], pa.string())})
    if kind == "arrow":  # `datasets`' save_to_disk writes the Arrow stream format
        data = handle.read()
        try:
            return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(pa.py_buffer(data)).read_all()
    raise ValueError(f"unknown manifest format {kind!r}")

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
from pipeline.core.words import count

ROWS_PER_GROUP = 1 << 20
FORMATS = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".txt": "text", ".arrow": "arrow",
}  # fmt: skip
# The metadata files a `datasets` folder holds beside its Arrow files: not manifests.
DATASETS_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
FORMAT_NAMES = "Parquet, CSV, TSV, JSON Lines, JSON, text or Arrow (a `datasets` folder)"
_TEXT_COLUMNS = ("id", "prompt", "negative_prompt")


AUTO = "auto"  # `manifest_format: auto`: each file by its extension
KINDS = ("parquet", "csv", "tsv", "jsonl", "json", "text", "arrow")  # `manifest_format`'s other values
_LABELS = {
    "parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "json": "JSON", "text": "text",
    "arrow": "Arrow",
}  # fmt: skip


def manifest_format(path: str, chosen: str = AUTO) -> str | None:
    """The format a manifest file is read in (None: not a manifest file): `chosen` (the job's
    `manifest_format`) unless it is `auto`, else the file's extension. A `datasets` folder's
    metadata files are never manifests."""
    name = posixpath.basename(path)
    if name in DATASETS_METADATA:
        return None
    if chosen != AUTO:
        return chosen
    return FORMATS.get(posixpath.splitext(name)[1].lower())


def in_folder(path: str, chosen: str) -> bool:
    """Whether a file found in a manifest folder is one of its manifest files: with `auto`, a file
    with a manifest extension; with one format chosen, a file with that format's extension or
    none (`part-00000`), so that a README.md beside them is not read as prompts."""
    if posixpath.basename(path) in DATASETS_METADATA:
        return False
    if chosen == AUTO:
        return manifest_format(path) is not None
    suffix = posixpath.splitext(posixpath.basename(path))[1].lower()
    return not suffix or FORMATS.get(suffix) == chosen


def extensions(kind: str) -> str:
    """`kind`'s extensions, for messages: `.jsonl` or `.ndjson`."""
    return " or ".join(f"`{suffix}`" for suffix, name in FORMATS.items() if name == kind)


def read_as(path: str, chosen: str = AUTO) -> tuple[str, str]:
    """The format a manifest file is read in, and how it was chosen (for messages): `chosen`, by
    its extension, or Parquet for a file without a known extension (a glob, or a single file)."""
    if chosen != AUTO:
        return chosen, f"manifest_format: {chosen}"
    kind = manifest_format(path)
    if kind is None:
        return "parquet", "no manifest extension, so read as Parquet; set manifest_format for another format"
    return kind, "chosen by its extension; set manifest_format if it holds another format"


def label(kind: str) -> str:
    return _LABELS.get(kind, kind)


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


def read_table_file(handle: IO[bytes], kind: str, uri: str, how: str = "") -> TableFile:
    """Read a non-Parquet manifest file whole; a file its format cannot read is a ManifestError
    naming it, the format tried and `how` it was chosen (`read_as`). A value that no column type
    can hold (text in a seed column, an object for a prompt) is a ManifestError naming its row."""
    try:
        table = _read(handle, kind, uri)
    except ManifestError:
        raise
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as error:
        why = f" ({how})" if how else ""
        raise ManifestError(
            f"not a readable {kind} file ({str(error).splitlines()[0][:300]}); check its format{why}", file=uri
        ) from None
    for name in _TEXT_COLUMNS:  # ids written as numbers, prompts read by type inference: text
        if name in table.column_names and pa.types.is_integer(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.string()))
    return TableFile(_numbers(table, uri))


# The columns that hold numbers: a CSV reader infers text for a column with one value like "7x".
_NUMBER_COLUMNS = ("seed", "width", "height", "steps", "guidance_scale")
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*$"


def _numbers(table: pa.Table, uri: str) -> pa.Table:
    """Number columns read as text (a CSV column with a value that is not a number, JSON numbers
    written as strings): numbers where every value is one, else a ManifestError naming the first
    row that is not (the whole column's type is at stake, as for a Parquet column of text)."""
    import pyarrow.compute as pc

    for name in _NUMBER_COLUMNS:
        if name not in table.column_names or not pa.types.is_string(table.schema.field(name).type):
            continue
        column = table.column(name)
        numeric = pc.fill_null(pc.match_substring_regex(column, _NUMBER), True)
        bad = pc.invert(numeric).to_numpy(zero_copy_only=False).nonzero()[0]
        if len(bad):
            value = column[int(bad[0])].as_py()
            raise ManifestError(
                f"{name} is not a number (got {value[:60]!r}; {count(len(bad), 'row')} of this column hold text): "
                "the column must hold numbers",
                file=uri,
                row=int(bad[0]),
                column=name,
            )
        text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, pc.utf8_trim_whitespace(column))
        try:
            values = pc.cast(text, pa.int64()) if name != "guidance_scale" else pc.cast(text, pa.float64())
        except pa.ArrowInvalid:  # "1.5", "1e3": the row checks say which rows are not integers
            values = pc.cast(text, pa.float64())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _read(handle: IO[bytes], kind: str, uri: str) -> pa.Table:
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
        data = handle.read()
        try:
            return pjson.read_json(io.BytesIO(data))
        except pa.ArrowInvalid:  # a value of another type than its column's, a line that is not JSON: which row
            return _from_rows(_json_lines(data, uri), uri)
    if kind == "json":
        rows: Any = json.load(io.TextIOWrapper(handle, encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError("expected a JSON array of objects, one per row")
        return _from_rows(rows, uri)
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


def _json_lines(data: bytes, uri: str) -> list[dict[str, Any]]:
    """A JSON Lines file's objects, one per line that is not blank (row r: the r-th of those)."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"line {number} is not JSON ({error.msg})", file=uri, row=len(rows)) from None
        if not isinstance(row, dict):
            raise ManifestError(f"line {number} is not a JSON object", file=uri, row=len(rows))
        rows.append(row)
    return rows


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _from_rows(rows: list[dict[str, Any]], uri: str) -> pa.Table:
    """A table from JSON objects, a column at a time: known text columns take numbers as text, known
    number columns take numbers (text is checked by `_numbers`); a value of a type its column
    cannot hold is a ManifestError naming its row and column."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = []
    for name in names:
        values = [row.get(name) for row in rows]
        kinds = [None if value is None else _kind(value) for value in values]
        if name in _TEXT_COLUMNS:
            allowed = {"text", "a number"}
            values = [v if k != "a number" else json.dumps(v) for v, k in zip(values, kinds, strict=True)]
        elif name in _NUMBER_COLUMNS:
            allowed = {"a number", "text"}
            if "text" in kinds:  # checked and converted by `_numbers`, as a CSV column of text is
                values = [v if k != "a number" else json.dumps(v) for v, k in zip(values, kinds, strict=True)]
        else:
            seen = [k for k in kinds if k is not None]
            allowed = {seen[0]} if seen else set()
        bad = next((i for i, k in enumerate(kinds) if k is not None and k not in allowed), None)
        if bad is not None:
            first = next(k for k in kinds if k is not None)
            expected = "text" if name in _TEXT_COLUMNS else "a number" if name in _NUMBER_COLUMNS else first
            raise ManifestError(
                f"expected {expected} (as the column's other values), got {kinds[bad]} ({_short(values[bad])})",
                file=uri,
                row=bad,
                column=name,
            )
        try:
            columns.append(pa.array(values))
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise ManifestError(
                f"values this column cannot hold together ({str(error).splitlines()[0][:200]})", file=uri, column=name
            ) from None
    return pa.table(columns, names=names) if names else pa.table({})


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."

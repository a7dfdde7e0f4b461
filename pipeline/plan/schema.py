"""One metadata schema for every part of a job.

A manifest's own columns (prompt, seed, settings) have fixed types; any other column is passed
through to the metadata. Manifest files often disagree on those: a column present in one file
only, an int column in one file and a float column in another. Parts written as each file had it
would differ in schema, and the readers people use on the output (pyarrow datasets, DuckDB and
Polars globs, Hugging Face's parquet and webdataset loaders) then drop columns, fail on the
mismatch, or truncate values. So the planner unifies the pass-through columns of every file
(`PassthroughSchema`: their union, each type widened where no value can change), every slice is
conformed to it when read, and every part is written with it. Types that no lossless widening
joins stop the job before any GPU work, naming both files and the column.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.core.errors import ManifestError

# Floats that hold every value of an integer type exactly: float64 has a 53-bit mantissa.
_EXACT_FLOAT_FOR_INT_BITS = 32


def widen(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The narrowest type that holds every value of `a` and of `b` unchanged, or None."""
    if a == b:
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if pa.types.is_dictionary(a) or pa.types.is_dictionary(b):  # pandas categoricals: join their values
        return widen(a.value_type if pa.types.is_dictionary(a) else a, b.value_type if pa.types.is_dictionary(b) else b)
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return _widen_integers(a, b)
    if _is_float(a) and _is_float(b):
        return a if a.bit_width >= b.bit_width else b
    if (pa.types.is_integer(a) and _is_float(b)) or (_is_float(a) and pa.types.is_integer(b)):
        integer = a if pa.types.is_integer(a) else b
        return pa.float64() if integer.bit_width <= _EXACT_FLOAT_FOR_INT_BITS else None
    for small, large in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {a, b} == {small, large}:
            return large
    return None


def _is_float(t: pa.DataType) -> bool:
    return bool(pa.types.is_floating(t))


def _widen_integers(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    signed_a, signed_b = pa.types.is_signed_integer(a), pa.types.is_signed_integer(b)
    if signed_a == signed_b:
        return a if a.bit_width >= b.bit_width else b
    signed, unsigned = (a, b) if signed_a else (b, a)
    bits = max(signed.bit_width, 2 * unsigned.bit_width)  # a signed type with room for the unsigned values
    return {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}.get(bits)


class PassthroughSchema:
    """The union of the manifest files' pass-through columns, planned one file at a time.

    Columns keep the order in which they first appear (files in order); `add` raises a
    ManifestError when a file's column type cannot be joined with the one seen before.
    """

    def __init__(self) -> None:
        self._fields: dict[str, tuple[pa.DataType, str]] = {}  # name -> (type, first file with it)

    def add(self, schema: pa.Schema, *, known: tuple[str, ...], uri: str) -> None:
        for field in schema:
            if field.name in known:
                continue
            seen = self._fields.get(field.name)
            if seen is None:
                self._fields[field.name] = (field.type, uri)
                continue
            joined = widen(seen[0], field.type)
            if joined is None:
                raise ManifestError(
                    f"this column is {field.type} here and {seen[0]} in {seen[1]}, and no type holds both without "
                    "changing values: every metadata part of a job has one schema; convert the column in one of "
                    "the files (or rename it in one)",
                    file=uri,
                    column=field.name,
                )
            self._fields[field.name] = (joined, seen[1])

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(name, type_) for name, (type_, _) in self._fields.items()])


def conform(table: pa.Table, schema: pa.Schema, *, keep: tuple[str, ...] = ()) -> pa.Table:
    """`table` with the `keep` columns it has, then exactly `schema`'s columns: cast to their
    planned types (lossless: see `widen`), a column the table lacks as typed nulls."""
    columns = [table.column(name) for name in keep if name in table.column_names]
    fields = [table.schema.field(name) for name in keep if name in table.column_names]
    for field in schema:
        present = field.name in table.column_names
        columns.append(table.column(field.name).cast(field.type) if present else pa.nulls(table.num_rows, field.type))
        fields.append(field)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def resume_passthrough(planned: pa.Schema, committed: pa.Schema | None, *, fixed: pa.Schema, output: str) -> pa.Schema:
    """The pass-through columns of a job whose output already has committed parts (`committed`:
    their schema, None for a new output): the committed ones, when the manifest's columns as
    planned fit into them unchanged (a column the new files lack is written as nulls, a narrower
    type is widened), so every part keeps one schema across incremental runs. A manifest that
    needs another column or a wider type than the committed parts have stops the job."""
    if committed is None:
        return planned
    if committed.names[: len(fixed)] != fixed.names or any(committed.field(f.name).type != f.type for f in fixed):
        raise ManifestError(
            f"the output {output} holds metadata parts written by an earlier version of sdxl-batch (their "
            f"columns: {', '.join(committed.names[: len(fixed)])}; this version writes {', '.join(fixed.names)}). "
            "Render into a new output, or pass --overwrite to discard it."
        )
    kept = pa.schema(list(committed)[len(fixed) :])
    changes = []
    for field in planned:
        if field.name not in kept.names:
            changes.append(f"`{field.name}` ({field.type}) is new")
        elif widen(kept.field(field.name).type, field.type) != kept.field(field.name).type:
            changes.append(f"`{field.name}` is {field.type} now, {kept.field(field.name).type} in the committed parts")
    if changes:
        raise ManifestError(
            f"the manifest's pass-through columns no longer fit the metadata parts already committed in {output}: "
            f"{'; '.join(changes)}. Every part of an output has one schema: make the new manifest files match "
            "(drop, rename or convert the column), render them into a new output, or pass --overwrite."
        )
    return kept

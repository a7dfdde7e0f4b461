"""Property-based tests (hypothesis) of the manifest reader, the job validator and the config loader.

The property throughout: whatever the schema, the values or the bytes of a manifest, and whatever
the keys and values of a config, the outcome is success or an `SdxlBatchError` whose message says
where the problem is; never another exception. On success the plan must agree with an independent
oracle of the manifest contract (which rows are bad, which ids), and reading every slice must
return exactly the rows the plan kept, with the normalised schema.
"""

from __future__ import annotations

import datetime
import decimal
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipeline.core.config import build_config, load_config
from pipeline.core.errors import ConfigError, ManifestError, SdxlBatchError
from pipeline.models.presets import get_preset
from pipeline.plan.job import plan_job, raise_for_bad_rows, write_rejects
from pipeline.plan.manifest import (
    GENERIC_RULES,
    RESERVED_COLUMNS,
    SEED_LIMIT,
    Fragment,
    RowRules,
    derive_seeds,
    read_fragment,
    rules_for,
)
from pipeline.plan.rows import RowPlan, read_pending
from pipeline.plan.schema import conform
from pipeline.plan.settings import group_by_settings
from pipeline.run.stages import ReadManifest
from tests.helpers import pending_mask, plan_manifest

_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(_FUZZ, max_examples=examples)


# ---------------------------------------------------------------------------------------------
# Random manifests


INT_TYPES = {
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
}
FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
STRING_TYPES = {"string": pa.string(), "large_string": pa.large_string()}
OTHER_TYPES = {
    "bool": pa.bool_(),
    "binary": pa.binary(),
    "null": pa.null(),
    "list<int>": pa.list_(pa.int64()),
    "timestamp": pa.timestamp("ms"),
    "dictionary<string>": pa.dictionary(pa.int32(), pa.string()),
    "decimal": pa.decimal128(20, 0),
    "date32": pa.date32(),
}
TYPES: dict[str, pa.DataType] = {**STRING_TYPES, **INT_TYPES, **FLOAT_TYPES, **OTHER_TYPES}
NUMBER_TYPES = [*INT_TYPES, *FLOAT_TYPES]
# The types the contract accepts for each known column; others must be a schema error.
ACCEPTED: dict[str, set[str]] = {
    "prompt": {*STRING_TYPES, "null"},
    "id": {*STRING_TYPES, "null"},
    "negative_prompt": {*STRING_TYPES, "null"},
    **{name: {*NUMBER_TYPES, "null"} for name in ("seed", "width", "height", "steps", "guidance_scale")},
}
KNOWN = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale")
TARGET_TYPES = {
    "id": pa.string(),
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "seed": pa.int64(),
    "width": pa.int32(),
    "height": pa.int32(),
    "steps": pa.int32(),
    "guidance_scale": pa.float64(),
}
# The types a well-formed manifest would use, drawn more often than the rest.
LIKELY = {
    "prompt": ["string", "large_string"],
    "id": ["string", "large_string"],
    "negative_prompt": ["string", "null"],
    "seed": ["int64", "uint64", "float64", "int32", "float32"],
    "width": ["int64", "float64", "int16", "null"],
    "height": ["int32", "float32", "uint16", "null"],
    "steps": ["int64", "float64", "uint8", "null"],
    "guidance_scale": ["float64", "float32", "int64", "float16", "null"],
}

TEXTS = ["a photo of a cat", "a photo of a cat", "dog", "", " ", "\t\n", "\u3000", "ü 🐍 ☃", "a\x00b", "x" * 300]
INTS = [0, 1, 4, 8, 64, 128, 512, 1024, 2048, -1, 7, 1000, 1001, 16384, 16392, 2**31 - 1]
INTS += [2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
FLOATS = [0.0, 1.0, 4.0, 8.0, 64.0, 512.0, 1.5, 7.5, -0.0, -1.0, 100.0, 100.5, 1e30, 2.0**53 + 2]
FLOATS += [2.0**63 - 1024, 2.0**63, math.nan, math.inf, -math.inf, 5e-324]
NAMES = [*RESERVED_COLUMNS, "note", "tag", "extra", "skip", "Prompt", "id ", "", "prompt", "seed", "width"]


def _int_range(t: pa.DataType) -> tuple[int, int]:
    bits = t.bit_width
    return (0, 2**bits - 1) if pa.types.is_unsigned_integer(t) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def values_of(kind: str) -> st.SearchStrategy[Any]:
    """Values (None included) of the Arrow type named `kind`, biased to edge cases."""
    t = TYPES[kind]
    value: st.SearchStrategy[Any]
    if kind in STRING_TYPES or kind == "dictionary<string>":
        value = st.sampled_from(TEXTS) | st.text(max_size=8)
    elif kind in INT_TYPES:
        low, high = _int_range(t)
        value = st.sampled_from([v for v in INTS if low <= v <= high]) | st.integers(low, high)
    elif kind in FLOAT_TYPES:
        value = st.sampled_from(FLOATS) | st.floats()  # cast to the type when written
    elif kind == "bool":
        value = st.booleans()
    elif kind == "binary":
        value = st.binary(max_size=6)
    elif kind == "null":
        return st.none()
    elif kind == "list<int>":
        value = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)
    elif kind == "timestamp":
        value = st.datetimes(datetime.datetime(1970, 1, 1), datetime.datetime(2100, 1, 1))
    elif kind == "decimal":
        value = st.integers(-(10**19), 10**19).map(decimal.Decimal)
    else:
        value = st.dates(datetime.date(1970, 1, 1), datetime.date(2100, 1, 1))
    return st.none() | value


# Values within the contract (for most presets), so that some manifests have no bad row at all.
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.sampled_from(["a photo of a cat", "dog", "ü 🐍 ☃", "x" * 300]) | st.text(min_size=1, max_size=8),
    "negative_prompt": st.sampled_from([None, "", "blurry"]),
    "seed": st.integers(0, 127) | st.sampled_from([0, 2**31 - 1, 2**63 - 1]),
    "width": st.sampled_from([None, 64, 512, 1024]),
    "height": st.sampled_from([None, 64, 512, 1024]),
    "steps": st.sampled_from([None, 1, 4]),
    "guidance_scale": st.sampled_from([None, 0.0, 1.0]),
}


def good_values_of(name: str, kind: str) -> st.SearchStrategy[Any]:
    """Values of a known column that break no rule, where its type can hold them."""
    if name not in GOOD_VALUES or kind not in ACCEPTED[name] or kind == "null":
        return values_of(kind)
    if kind not in INT_TYPES:
        return GOOD_VALUES[name]
    low, high = _int_range(TYPES[kind])
    return GOOD_VALUES[name].filter(lambda v: v is None or low <= v <= high)


def make_array(kind: str, values: list[Any]) -> pa.Array:
    t = TYPES[kind]
    if kind in FLOAT_TYPES:
        dtype = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[kind]
        with np.errstate(over="ignore"):
            data = np.array([0.0 if v is None else v for v in values], dtype=np.float64).astype(dtype)
        return pa.array(data, mask=np.array([v is None for v in values], dtype=bool), type=t)
    return pa.array(values, type=t)


@dataclass
class FileSpec:
    relpath: str
    columns: list[tuple[str, str, list[Any]]]  # name, type name, values
    row_group_size: int
    compression: str

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.columns]

    def array(self, name: str) -> pa.Array:
        for column, kind, values in self.columns:
            if column == name:
                return make_array(kind, values)
        raise KeyError(name)

    def values(self, name: str) -> list[Any]:
        """A column's values as Arrow reads them back (float32 1.1 is not Python's 1.1)."""
        return self.array(name).to_pylist()  # type: ignore[no-any-return]

    def write(self, root: Path) -> None:
        rows = len(self.columns[0][2]) if self.columns else 0
        arrays = [make_array(kind, values) for _, kind, values in self.columns]
        table = pa.table(arrays, names=self.names) if arrays else pa.table({"x": pa.nulls(rows)})
        path = root / self.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=self.row_group_size, compression=self.compression)


Schema = list[tuple[str, str]]


def _rarely(draw: st.DrawFn, percent: int) -> bool:
    """True `percent`% of the time; shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - percent


@st.composite
def schemas(draw: st.DrawFn, *, weird: bool = True) -> Schema:
    """Random subsets of the known columns with random types, plus extra columns. Mostly types the
    contract accepts, so that most manifests get past the schema check to their rows."""
    schema: Schema = []
    for name in KNOWN:
        if _rarely(draw, 4) if name in ("prompt", "seed") else draw(st.booleans()):
            continue
        if weird and _rarely(draw, 8):
            kinds = sorted(TYPES)
        else:
            kinds = sorted(ACCEPTED[name]) if _rarely(draw, 25) else LIKELY[name]
        schema.append((name, draw(st.sampled_from(kinds))))
    if draw(st.booleans()):
        schema.reverse()
    for _ in range(draw(st.integers(0, 2))):
        if weird and _rarely(draw, 15):  # reserved names, and known names twice
            schema.append((draw(st.sampled_from(NAMES)), draw(st.sampled_from(sorted(TYPES)))))
            continue
        name = draw(st.sampled_from(["note", "tag", "extra"]) | st.text(max_size=5))
        kind = draw(st.sampled_from(sorted(TYPES) if weird else ["string", "int64", "list<int>"]))
        if name not in dict(schema) and name not in KNOWN and name not in RESERVED_COLUMNS:
            schema.append((name, kind))
    return schema


@st.composite
def manifests(draw: st.DrawFn, *, weird: bool = True, max_rows: int = 10) -> list[FileSpec]:
    """One to three Parquet files, each with a random schema (often shared), values and row groups."""
    shared = draw(schemas(weird=weird))
    paths = draw(
        st.lists(st.sampled_from(["a.parquet", "b.parquet", "sub/a.parquet", "sub__a.parquet", "z/y/x.parquet"]),
                 min_size=1, max_size=3, unique=True)
    )  # fmt: skip
    clean = _rarely(draw, 40)  # values that break no rule, in every file
    files = []
    for relpath in sorted(paths):
        schema = draw(st.sampled_from([shared]) | schemas(weird=weird))
        rows = draw(st.integers(0 if weird else 1, max_rows))
        columns = []
        for name, kind in schema:
            if clean and name == "id" and kind in STRING_TYPES:
                values = [f"{relpath}#{i}" for i in range(rows)]
            else:
                values = draw(
                    st.lists(good_values_of(name, kind) if clean else values_of(kind), min_size=rows, max_size=rows)
                )
            columns.append((name, kind, values))
        files.append(FileSpec(relpath, columns, draw(st.integers(1, 8)), draw(st.sampled_from(["snappy", "none"]))))
    return files


def write_all(files: list[FileSpec], root: Path) -> None:
    for spec in files:
        spec.write(root)


# ---------------------------------------------------------------------------------------------
# An independent oracle of the manifest contract


def schema_problem(files: list[FileSpec]) -> str | None:
    """Why planning must refuse these files as a whole, or None."""
    for spec in files:
        names = spec.names
        if len(set(names)) != len(names):
            return "duplicate column"
        kinds = {name: kind for name, kind, _ in spec.columns}
        if "prompt" not in kinds:  # seeds are optional: derived from ids where absent
            return "missing column"
        for name, kind in kinds.items():
            if name in ACCEPTED and kind not in ACCEPTED[name]:
                return "mistyped column"
            if name in RESERVED_COLUMNS:
                return "reserved column"
    if sum(len(spec.columns[0][2]) for spec in files) == 0:
        return "no rows"
    seen: dict[str, str] = {}
    for spec in files:
        for name, kind, _ in spec.columns:
            if name in KNOWN:
                continue
            if name in seen and not joinable(seen[name], kind):
                return "pass-through types that no type holds"
            seen.setdefault(name, kind)
    return None


# What each kind's values are, for the pass-through columns: a lossless join exists exactly when
# one type holds every value of both kinds.
INT_RANGES = {k: (-(2 ** (t.bit_width - 1)), 2 ** (t.bit_width - 1) - 1) if pa.types.is_signed_integer(t)
              else (0, 2**t.bit_width - 1) for k, t in INT_TYPES.items()}  # fmt: skip


def joinable(a: str, b: str) -> bool:
    a, b = ("string" if k == "dictionary<string>" else k for k in (a, b))
    if a == b or "null" in (a, b) or {a, b} <= set(STRING_TYPES) or {a, b} <= set(FLOAT_TYPES):
        return True
    if {a, b} <= {k for k in INT_TYPES if k.startswith("uint")}:  # the wider unsigned type holds both
        return True
    if {a, b} <= set(INT_TYPES):  # some int64 or narrower type holds both ranges
        low, high = min(INT_RANGES[a][0], INT_RANGES[b][0]), max(INT_RANGES[a][1], INT_RANGES[b][1])
        return low >= -(2**63) and high <= 2**63 - 1
    if (a in INT_TYPES and b in FLOAT_TYPES) or (b in INT_TYPES and a in FLOAT_TYPES):  # float64 holds |n| < 2**53
        low, high = INT_RANGES[a if a in INT_TYPES else b]
        return low >= -(2**53) and high <= 2**53
    return False


def _bad_text(value: Any) -> bool:
    return value is None or not value.strip()


def _bad_integer(value: Any, low: float, high: float) -> bool:
    """An integer-valued setting outside [low, high], or not an integer (NaN, inf, 1.5)."""
    if isinstance(value, float) and (not math.isfinite(value) or value != math.floor(value)):
        return True
    return not low <= value <= high


def _bad_seed(value: Any) -> bool:
    return value is None or _bad_integer(value, 0, math.inf) or value >= SEED_LIMIT  # exact: no float rounding


def row_is_bad(row: dict[str, Any], rules: RowRules) -> bool:
    if _bad_text(row["prompt"]) or ("id" in row and _bad_text(row["id"])):
        return True
    if "seed" in row and _bad_seed(row["seed"]):
        return True
    for name in ("width", "height"):
        value = row.get(name)
        if value is not None and (_bad_integer(value, *rules.size_range) or value % 8):
            return True
    if row.get("steps") is not None and _bad_integer(row["steps"], *rules.steps_range):
        return True
    guidance = row.get("guidance_scale")
    low, high = rules.guidance_range
    return guidance is not None and not (math.isfinite(guidance) and low <= guidance <= high)


def source_rows(spec: FileSpec) -> list[dict[str, Any]]:
    names = [name for name in spec.names if name in KNOWN]
    columns = {name: spec.values(name) for name in names}
    rows = len(spec.columns[0][2])
    return [{name: columns[name][i] for name in names} for i in range(rows)]


def expected_ids(spec: FileSpec) -> list[str | None]:
    if "id" in spec.names:
        return spec.values("id")
    stem = spec.relpath.removesuffix(".parquet").replace("/", "__")
    return [f"{stem}-{row:09d}" for row in range(len(spec.columns[0][2]))]


def expected_rejected(files: list[FileSpec], rules: RowRules) -> tuple[np.ndarray, list[str | None]]:
    """Bad rows per the contract, then every later occurrence of a good row's id."""
    bad = [row_is_bad(row, rules) for spec in files for row in source_rows(spec)]
    ids = [i for spec in files for i in expected_ids(spec)]
    seen: set[str | None] = set()
    for position, value in enumerate(ids):
        if bad[position]:
            continue
        if value in seen:
            bad[position] = True
        seen.add(value)
    return np.array(bad, dtype=bool), ids


# ---------------------------------------------------------------------------------------------
# Properties 1 and 2: planning and reading random manifests


def check_slices(plan: RowPlan, files: list[FileSpec], root: Path, rules: RowRules) -> None:
    """Every read task reads back exactly the rows the plan kept, normalised, with their source values."""
    by_uri = {str(root / spec.relpath): spec for spec in files}
    read_ids: list[str] = []
    for task in plan.read_tasks():
        spec = by_uri[task["uri"]]
        rows = source_rows(spec)
        mask = plan.pending_mask(task["file"])
        table = read_pending(task, mask, None, rules)
        assert table.num_rows == task["pending"]
        assert table.column_names[:8] == list(KNOWN)
        assert [table.schema.field(i).type for i in range(8)] == [TARGET_TYPES[n] for n in KNOWN]
        assert table.column_names[8:] == [n for n in spec.names if n not in KNOWN]
        positions = [p for p in range(task["row_offset"], task["row_offset"] + task["num_rows"]) if mask[p]]
        ids = table.column("id").to_pylist()
        read_ids += ids
        for got, p in zip(table.to_pylist(), positions, strict=True):
            row = rows[p]
            assert got["prompt"] == row["prompt"] and got["prompt"].strip()
            expected_seed = row["seed"] if "seed" in row else derive_seeds(pa.array([got["id"]]))[0].as_py()
            assert got["seed"] == expected_seed and 0 <= got["seed"] < SEED_LIMIT
            for name in ("negative_prompt", "width", "height", "steps", "guidance_scale"):
                assert got[name] == row.get(name)
            if got["width"] is not None:
                assert got["width"] % 8 == 0
            if got["guidance_scale"] is not None:
                assert math.isfinite(got["guidance_scale"])
        conformed = conform(table, plan.passthrough, keep=KNOWN)
        assert conformed.column_names == [*KNOWN, *plan.passthrough.names]
        for name in table.column_names[8:]:
            source = spec.array(name).take(pa.array(positions, pa.int64()))
            assert repr(table.column(name).to_pylist()) == repr(source.to_pylist())
            assert _same_values(conformed.column(name).to_pylist(), source.to_pylist())  # lossless
        for name in set(plan.passthrough.names) - set(table.column_names):
            assert conformed.column(name).null_count == table.num_rows
    rejected, ids = expected_rejected(files, rules)
    expected = [i for i, bad in zip(ids, rejected, strict=True) if not bad]
    assert read_ids == expected
    assert len(set(read_ids)) == len(read_ids) and None not in read_ids


def _same_values(a: list[Any], b: list[Any]) -> bool:
    def norm(v: Any) -> Any:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [norm(v) for v in a] == [norm(v) for v in b]


def check_plan(plan: RowPlan, files: list[FileSpec], root: Path, keep: bool, rules: RowRules) -> None:
    rejected, _ = expected_rejected(files, rules)
    assert plan.total_rows == len(rejected) == sum(sum(scan.row_groups) for scan in plan.scans)
    assert (~pending_mask(plan)).tolist() == rejected.tolist()
    assert plan.problem_count == int(rejected.sum()) == sum(plan.problem_columns.values())
    assert plan.problems.num_rows == (plan.problem_count if keep else min(plan.problem_count, 20))
    assert plan.good_rows == plan.total_rows - plan.problem_count == plan.pending_rows
    for line in plan.problem_lines(limit=1000):
        assert line.startswith(f"file {root}") and ", row " in line and ", column '" in line
    if keep:  # every bad row is listed, at its position
        starts = dict(zip(plan.files, np.cumsum([0, *(scan.rows for scan in plan.scans)]).tolist(), strict=False))
        listed = sorted(starts[r["file"]] + r["row"] for r in plan.problems.select(["file", "row"]).to_pylist())
        assert listed == np.flatnonzero(rejected).tolist()


def _expect_manifest_error(error: SdxlBatchError, root: Path) -> None:
    assert isinstance(error, ManifestError), repr(error)
    assert str(root) in str(error), str(error)


@fuzz(250)
@given(files=manifests())
@example(  # a NaN seed passed planning, then failed the cast to int64 in read_fragment
    files=[FileSpec("a.parquet", [("prompt", "string", ["p"]), ("seed", "float64", [math.nan])], 1, "none")],
)
@example(  # NaN width and guidance passed planning; NaN width crashed normalize, NaN guidance reached the model
    files=[
        FileSpec(
            "a.parquet",
            [
                ("prompt", "string", ["p", "q"]),
                ("seed", "int64", [1, 2]),
                ("width", "float32", [math.nan, 64.0]),
                ("guidance_scale", "float64", [1.0, math.nan]),
            ],
            2,
            "none",
        )
    ],
)
@example(  # an integer setting past 2**53 raised ArrowInvalid from the cast to float64
    files=[
        FileSpec(
            "a.parquet",
            [
                ("prompt", "string", ["p", "q"]),
                ("seed", "int64", [1, 2]),
                ("steps", "uint64", [2**64 - 1, 4]),
                ("guidance_scale", "int64", [1, 2**53 + 1]),
            ],
            2,
            "none",
        )
    ],
)
@example(  # a duplicated column name raised KeyError from the schema check
    files=[
        FileSpec("a.parquet", [("prompt", "string", ["p"]), ("seed", "int64", [1]), ("seed", "int64", [2])], 1, "none")
    ],
)
@example(  # the seed range's edges: 2**63 - 1 is the last seed; float32 rounds 2**63 - 1024 up to 2**63
    files=[
        FileSpec("a.parquet", [("prompt", "string", ["p", "q"]), ("seed", "uint64", [2**63 - 1, 2**63])], 1, "none"),
        FileSpec(
            "b.parquet", [("prompt", "string", ["p", "q"]), ("seed", "float32", [2.0**62, 2.0**63 - 1024])], 2, "none"
        ),
    ],
)
def test_random_manifests_plan_and_read(files: list[FileSpec]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_all(files, root)
        outcomes: list[list[bool] | None] = []
        for keep in (False, True):
            try:
                plan = plan_manifest(str(root), keep_problems=keep)
            except SdxlBatchError as error:
                _expect_manifest_error(error, root)
                outcomes.append(None)
                continue
            check_plan(plan, files, root, keep, GENERIC_RULES)
            outcomes.append((~pending_mask(plan)).tolist())
        assert outcomes[0] == outcomes[1]
        problem = schema_problem(files)
        event(
            f"refused: {problem}"
            if problem
            else "planned"
            if outcomes[0] and any(outcomes[0])
            else "planned, no bad row"
        )
        assert (outcomes[0] is None) == (problem is not None), problem
        if outcomes[0] is not None:
            check_slices(plan, files, root, GENERIC_RULES)


def test_duplicate_column_name_is_a_clear_error(tmp_path: Path) -> None:
    table = pa.table([pa.array(["p"]), pa.array([1]), pa.array(["q"])], names=["prompt", "seed", "prompt"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="appears 2 times") as info:
        plan_manifest(str(tmp_path / "m.parquet"))
    assert "m.parquet" in str(info.value) and "'prompt'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Property 3: validating whole jobs


PRESETS = ["tiny", "lightning-4step", "sdxl-base", "turbo", "lcm"]


@fuzz(80)
@given(
    files=manifests(weird=False, max_rows=20),
    preset=st.sampled_from(PRESETS),
    on_bad_row=st.sampled_from(["skip", "fail"]),
    batch_size=st.integers(1, 8),
    actors=st.integers(1, 3),
)
def test_random_jobs_validate(
    files: list[FileSpec], preset: str, on_bad_row: str, batch_size: int, actors: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_all(files, root / "m")
        config = build_config({
            "manifest": str(root / "m"),
            "output": str(root / "out"),
            "model": {"preset": preset},
            "on_bad_row": on_bad_row,
            "generation": {"batch_size": batch_size},
            "resources": {"actors": actors},
        })  # fmt: skip
        try:
            job = plan_job(config)
        except SdxlBatchError as error:
            _expect_manifest_error(error, root / "m")
            assert schema_problem(files) is not None
            event("refused")
            return
        event(f"planned, {'with' if job.manifest.problem_count else 'no'} bad rows, on_bad_row: {on_bad_row}")
        rules = rules_for(get_preset(preset))
        check_plan(job.manifest, files, root / "m", on_bad_row == "skip", rules)
        lines = job.summary_lines()
        assert all(isinstance(line, str) for line in lines)
        assert any(line.startswith("to render") for line in lines)
        try:
            raise_for_bad_rows(job)
        except ManifestError as error:
            assert on_bad_row == "fail" and job.manifest.problem_count
            assert "row" in str(error) and "column" in str(error) and str(root / "m") in str(error)
        else:
            assert on_bad_row == "skip" or not job.manifest.problem_count
            assert len(write_rejects(job)) == len({str(f) for f in job.manifest.problems.column("file").to_pylist()})
        stage = ReadManifest(storage=config.storage, defaults=job.defaults, rules=rules, masks=job.manifest.masks)
        rows = 0
        for task in job.manifest.read_tasks():
            table = stage(pa.Table.from_pylist([task]))
            rows += table.num_rows
            assert table.num_rows == task["pending"]
            assert sum(len(ix) for ix in group_by_settings(table).values()) == table.num_rows
        assert rows == job.pending_rows == job.manifest.good_rows
        assert sum(count for _, count in job.render_groups()) == job.pending_rows


# ---------------------------------------------------------------------------------------------
# Property 4: corrupted files


@dataclass(frozen=True)
class Corruption:
    """Damage to a Parquet file's bytes: cut it at `at` (a fraction of its length), zero `length`
    bytes there, or XOR bytes (`flips`: where, mask) anywhere or in the Thrift footer."""

    kind: str
    at: float
    length: int
    flips: tuple[tuple[float, int], ...]

    def apply(self, data: bytes) -> bytes:
        buffer = bytearray(data)
        at = min(int(self.at * len(data)), len(data) - 1)
        if self.kind == "truncate":
            return bytes(buffer[:at])
        if self.kind == "zero":
            end = min(at + self.length, len(data))
            buffer[at:end] = bytes(end - at)
            return bytes(buffer)
        span = min(len(data), 200) if self.kind == "flip-footer" else len(data)
        for where, mask in self.flips:
            buffer[len(data) - span + min(int(where * span), span - 1)] ^= mask
        return bytes(buffer)


corruptions = st.builds(
    Corruption,
    kind=st.sampled_from(["truncate", "zero", "flip", "flip-footer"]),
    at=st.floats(0, 1),
    length=st.integers(1, 64),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8).map(tuple),
)


@fuzz(250)
@given(
    files=manifests(weird=False, max_rows=12),
    compression=st.sampled_from(["none", "snappy", "zstd", "gzip"]),
    corruption=corruptions,
)
def test_corrupted_manifests(files: list[FileSpec], compression: str, corruption: Corruption) -> None:
    files = [replace(files[0], compression=compression), *files[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_all(files, root)
        path = root / files[0].relpath
        path.write_bytes(corruption.apply(path.read_bytes()))
        try:
            plan = plan_manifest(str(root), keep_problems=True)
        except SdxlBatchError as error:
            _expect_manifest_error(error, root)
            event(f"{corruption.kind}: refused by plan_manifest")
            return
        event(f"{corruption.kind}: planned")
        for task in plan.read_tasks():
            try:
                table = read_pending(task, plan.pending_mask(task["file"]), None)
            except SdxlBatchError as error:
                _expect_manifest_error(error, root)
                event(f"{corruption.kind}: refused by read_fragment")
                continue
            assert table.num_rows == task["pending"]


def test_garbled_column_name_in_footer_is_a_clear_error(tmp_path: Path) -> None:
    """Found by the fuzzer: a column name that is not UTF-8 raised UnicodeDecodeError from pyarrow."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["p"], "seed": [1], "note": ["x"]}), buffer, store_schema=False)
    path = tmp_path / "m.parquet"
    path.write_bytes(buffer.getvalue().to_pybytes().replace(b"note", b"no\xfft"))
    with pytest.raises(ManifestError, match="not a readable Parquet file") as info:
        plan_manifest(str(path))
    assert str(path) in str(info.value)


def _latin1_strings(values: list[bytes]) -> pa.Array:
    """A string array holding bytes that are not UTF-8, as a writer with another encoding makes."""
    offsets = np.cumsum([0, *(len(v) for v in values)], dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    )


@pytest.mark.parametrize("column", ["prompt", "note"])
def test_text_that_is_not_utf8_is_a_clear_error(tmp_path: Path, column: str) -> None:
    """Found by the fuzzer: Parquet readers do not check UTF-8, so the row checks raised ArrowInvalid
    (or `to_pylist` UnicodeDecodeError), and a pass-through column reached the workers unchecked."""
    latin1 = _latin1_strings([b"caf\xe9", b"ok", b"na\xefve"])
    table = pa.table({"prompt": pa.array(["a", "b", "c"]), "seed": [1, 2, 3], "note": pa.array(["x", "y", "z"])})
    table = table.set_column(table.schema.get_field_index(column), column, latin1)
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=2)
    with pytest.raises(ManifestError, match="not valid UTF-8") as info:
        plan = plan_manifest(str(path))  # reads the prompts, not the pass-through columns
        for task in plan.read_tasks():
            read_pending(task, plan.pending_mask(task["file"]), None)
    assert f"file {path}, row 0, column '{column}'" in str(info.value)
    if column == "note":  # the second row group: rows count from the file's start
        task = plan.read_tasks()[1]
        with pytest.raises(ManifestError, match=f"row 2, column '{column}'"):
            read_fragment(Fragment(**{name: task[name] for name in Fragment.__dataclass_fields__}))


# ---------------------------------------------------------------------------------------------
# Property 5: configs and --set overrides

SECTIONS = ["model", "generation", "write", "resources", "storage"]
KEYS = [
    "manifest", "output", "on_bad_row", *SECTIONS, "preset", "path", "batch_size", "width", "height", "steps",
    "guidance_scale", "image_format", "layout", "rows_per_part", "actors", "gpus_per_actor", "endpoint_url",
    "anon", "loras", "weight", "lora", "dtype", "unknown", "batchsize", "",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["m.parquet", "out", "tiny", "skip", "fail", "png", "webdataset", "auto", "1e3"])
)
yaml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
configs = st.dictionaries(st.sampled_from(KEYS) | st.integers(), yaml_values, max_size=6)
override_keys = st.lists(st.sampled_from(KEYS) | st.text(max_size=3), min_size=0, max_size=3).map(".".join)
override_values = (
    st.sampled_from(["8", "null", "[", "{a: 1", "'x", "- a", "*x", "!!python/object:os.system", "a: b: c", "@", "\t"])
    | st.text(max_size=8)
    | yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
)
overrides = st.lists(st.tuples(override_keys, st.sampled_from(["=", ""]), override_values).map("".join), max_size=4)


@fuzz(300)
@given(data=configs)
def test_random_configs_build(data: dict[Any, Any]) -> None:
    try:
        config = build_config(data, source="fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith("invalid config fuzz.yaml:")
        return
    assert config.manifest.strip() and config.output.strip()


@fuzz(300)
@given(
    data=configs,
    items=overrides,
    text=st.none() | st.text(max_size=20) | st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
    raw=st.none() | st.binary(max_size=20),
    required=st.booleans(),
)
@example(data={}, items=["generation.batch_size=["], text=None, raw=None, required=True)  # raised yaml's ParserError
@example(data={}, items=[], text=None, raw=b"\xff\xfe\x00", required=True)  # raised UnicodeDecodeError
def test_random_configs_load_with_overrides(
    data: dict[Any, Any], items: list[str], text: str | None, raw: bytes | None, required: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        if raw is not None:
            path.write_bytes(raw)
        elif text is not None:
            path.write_text(text, encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            extra = {"manifest": "m.parquet", "output": "out"} if required else {}
            config = load_config(path, overrides=items, **extra)
        except ConfigError as error:
            message = str(error)
            assert str(path) in message or "--set" in message, message
            return
        assert config.manifest.strip() and config.output.strip()

"""One metadata schema per job: widening, the planned union, conforming, and resuming into an
output whose parts are already committed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import build_config
from pipeline.core.errors import ManifestError
from pipeline.core.layout import METADATA_FIELDS, metadata_schema
from pipeline.output.writer import ModelInfo, PartWriter
from pipeline.plan.job import plan_job
from pipeline.plan.schema import PassthroughSchema, conform, resume_passthrough, widen
from tests.output.test_writer import _encoded_batch


@pytest.mark.parametrize(
    ("a", "b", "joined"),
    [
        (pa.int32(), pa.int64(), pa.int64()),
        (pa.uint8(), pa.int8(), pa.int16()),
        (pa.uint32(), pa.int32(), pa.int64()),
        (pa.uint64(), pa.int64(), None),  # no integer type holds both
        (pa.int32(), pa.float64(), pa.float64()),
        (pa.uint32(), pa.float32(), pa.float64()),
        (pa.int64(), pa.float64(), None),  # float64 cannot hold every int64
        (pa.float16(), pa.float32(), pa.float32()),
        (pa.string(), pa.large_string(), pa.large_string()),
        (pa.null(), pa.timestamp("ms"), pa.timestamp("ms")),
        (pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.string()),
        (pa.bool_(), pa.string(), None),
        (pa.list_(pa.int64()), pa.list_(pa.int64()), pa.list_(pa.int64())),
    ],
)
def test_widen_is_lossless_or_refuses(a: pa.DataType, b: pa.DataType, joined: pa.DataType | None) -> None:
    assert widen(a, b) == joined and widen(b, a) == joined


def test_the_union_keeps_first_seen_order_and_names_both_files() -> None:
    planned = PassthroughSchema()
    planned.add(
        pa.schema([("prompt", pa.string()), ("b", pa.int32()), ("a", pa.string())]), known=("prompt",), uri="f1"
    )
    planned.add(pa.schema([("c", pa.bool_()), ("b", pa.float64())]), known=("prompt",), uri="f2")
    assert planned.schema() == pa.schema([("b", pa.float64()), ("a", pa.string()), ("c", pa.bool_())])
    with pytest.raises(ManifestError) as info:
        planned.add(pa.schema([("c", pa.string())]), known=(), uri="f3")
    assert "f3" in str(info.value) and "f1" not in str(info.value) and "f2" in str(info.value)


def test_conform_casts_and_fills_nulls() -> None:
    table = pa.table({"id": ["x"], "b": pa.array([3], pa.int32()), "extra": ["dropped"]})
    schema = pa.schema([("b", pa.float64()), ("a", pa.string())])
    out = conform(table, schema, keep=("id",))
    assert out.schema == pa.schema([("id", pa.string()), ("b", pa.float64()), ("a", pa.string())])
    assert out.to_pylist() == [{"id": "x", "b": 3.0, "a": None}]


def test_resuming_keeps_the_committed_schema() -> None:
    committed = metadata_schema(pa.schema([("score", pa.float64()), ("note", pa.string())]))
    # New files without `note` and with a narrower `score`: they fit the committed parts.
    planned = pa.schema([("score", pa.int32())])
    assert resume_passthrough(planned, committed, fixed=METADATA_FIELDS, output="out") == pa.schema(
        [("score", pa.float64()), ("note", pa.string())]
    )
    assert resume_passthrough(planned, None, fixed=METADATA_FIELDS, output="out") == planned
    with pytest.raises(ManifestError, match=r"`tag` \(string\) is new"):
        resume_passthrough(pa.schema([("tag", pa.string())]), committed, fixed=METADATA_FIELDS, output="out")
    with pytest.raises(ManifestError, match="`score` is string now"):
        resume_passthrough(pa.schema([("score", pa.string())]), committed, fixed=METADATA_FIELDS, output="out")
    old = pa.schema([f for f in committed if f.name != "key"])
    with pytest.raises(ManifestError, match="earlier version of sdxl-batch"):
        resume_passthrough(pa.schema([]), old, fixed=METADATA_FIELDS, output="out")


def test_plan_job_stops_a_manifest_that_no_longer_fits_the_output(tmp_path: Path) -> None:
    """An incremental run whose new file adds a column: stopped before any GPU work, naming it."""
    manifest = tmp_path / "m"
    manifest.mkdir()
    pq.write_table(
        pa.table({"id": ["a", "b"], "prompt": ["p", "p"], "seed": [1, 2], "note": ["x", "y"]}), manifest / "1.parquet"
    )
    output = tmp_path / "out"
    writer = PartWriter(output=str(output), layout="files", image_format="png", model=ModelInfo("tiny", "Euler"))
    writer.write(_encoded_batch(["a", "b"]))  # committed with `note` (string)
    config = build_config({"manifest": str(manifest), "output": str(output), "model": {"preset": "tiny"}})
    assert plan_job(config).passthrough == pa.schema([("note", pa.string())])
    pq.write_table(pa.table({"id": ["c"], "prompt": ["p"], "seed": [3], "score": [0.5]}), manifest / "2.parquet")
    with pytest.raises(ManifestError, match=r"`score` \(double\) is new"):
        plan_job(config)

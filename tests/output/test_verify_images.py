"""`verify --manifest` on the output of a job with `images_per_prompt` and `manifest_format`: the
manifest's ids as that job (its job.json) read them: each row's images, a file read in its format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.verify import verify_output
from pipeline.plan.manifest import PROBLEM_SCHEMA, manifest_reading
from tests.output.test_verify import _parts


def test_the_job_record_says_how_the_manifest_was_read() -> None:
    assert manifest_reading(None) == manifest_reading({"config": {}}) == ("auto", 1)
    assert manifest_reading({"config": {"manifest_format": "csv", "images_per_prompt": 3}}) == ("csv", 3)


def test_verify_expands_each_row_into_its_images(tmp_path: Path) -> None:
    (tmp_path / "prompts").write_text("id,prompt\na,p\nb,q\nc,\n")  # CSV without an extension; c is a bad row
    output = _parts(tmp_path / "out", [["a", "a-1", "a-2"], ["b", "b-2", "stray"]])
    (output / "job.json").write_text(json.dumps({"config": {"manifest_format": "csv", "images_per_prompt": 3}}))
    (output / "rejects").mkdir()
    rejected = {"file": [str(tmp_path / "prompts")], "row": [2], "id": ["c"], "column": ["prompt"],
                "reason": ["prompt is missing (null)"], "prompt": [None], "seed": [None]}  # fmt: skip
    pq.write_table(pa.table(rejected, schema=PROBLEM_SCHEMA), output / "rejects" / "prompts.parquet")
    report = verify_output(str(output), manifest=str(tmp_path / "prompts"))
    assert (report.manifest_rows, report.rejected_rows) == (3, 1)
    assert report.problems == [
        "manifest id missing from the output (1): b-1",
        "output id not in the manifest (1): stray",
    ], report.summary()

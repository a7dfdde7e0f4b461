"""Manifests in the formats people keep prompts in (`plan.formats`): CSV, TSV, JSON Lines, JSON
arrays, plain text and a `datasets` folder of Arrow files, planned, validated and read as Parquet
is, with seeds derived from ids where a manifest has none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.core.config import build_config
from pipeline.core.errors import ManifestError
from pipeline.plan.job import plan_job
from pipeline.plan.manifest import derive_ids, derive_seeds
from pipeline.plan.rows import iter_pending

ROWS = [
    {"id": "a", "prompt": "a red car", "seed": 1},
    {"id": "b", "prompt": "", "seed": 2},  # bad: an empty prompt
    {"id": "c", "prompt": "a blue car", "seed": 3},
]


def _write(folder: Path, kind: str, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in row.values()) for row in rows]
        path = folder / f"m.{kind}"
        path.write_text("\n".join(lines) + "\n")
    elif kind == "jsonl":
        path = folder / "m.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = folder / "m.json"
        path.write_text(json.dumps(rows))
    else:  # a `datasets` save_to_disk folder: Arrow stream files beside its metadata
        path = folder / "ds"
        path.mkdir()
        with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
            table = pa.Table.from_pylist(rows)
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (path / "dataset_info.json").write_text("{}")
        (path / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    return path


def _plan(manifest: str, output: Path) -> Any:
    return plan_job(build_config({"manifest": manifest, "output": str(output), "on_bad_row": "skip"}))


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "arrow"])
def test_each_format_plans_and_reads_as_parquet_does(tmp_path: Path, kind: str) -> None:
    manifest = _write(tmp_path / "m", kind, ROWS)
    job = _plan(str(manifest), tmp_path / "out")
    rows = job.manifest
    assert (rows.total_rows, rows.problem_count, job.pending_rows) == (3, 1, 2)
    (problem,) = rows.problems.to_pylist()
    assert (problem["row"], problem["column"], problem["id"]) == (1, "prompt", "b")
    read = pa.concat_tables(iter_pending(rows, None))
    assert read.column("id").to_pylist() == ["a", "c"] and read.column("seed").to_pylist() == [1, 3]


def test_a_text_file_is_one_prompt_per_line_with_ids_and_seeds_derived(tmp_path: Path) -> None:
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("a lighthouse at dusk\n\na fox in the snow\n   \nan orange cat\n")
    first = pa.concat_tables(iter_pending(_plan(str(manifest), tmp_path / "out").manifest, None))
    assert first.column("prompt").to_pylist() == ["a lighthouse at dusk", "a fox in the snow", "an orange cat"]
    ids = derive_ids("prompts.txt", 0, 3)
    assert first.column("id").to_pylist() == ["prompts-000000000", "prompts-000000001", "prompts-000000002"]
    assert first.column("seed").to_pylist() == derive_seeds(ids).to_pylist()
    again = pa.concat_tables(iter_pending(_plan(str(manifest), tmp_path / "out").manifest, None))
    assert again.column("seed").equals(first.column("seed"))  # the same in every run
    assert all(0 <= seed < 2**63 for seed in first.column("seed").to_pylist())


def test_seeds_are_optional_in_every_format(tmp_path: Path) -> None:
    """Without a seed column, each row's seed derives from its id, the same wherever it is read."""
    rows = [{"id": "x", "prompt": "p"}, {"id": "y", "prompt": "q"}]
    for kind in ("csv", "jsonl"):
        read = pa.concat_tables(
            iter_pending(_plan(str(_write(tmp_path / kind, kind, rows)), tmp_path / "o").manifest, None)
        )
        assert read.column("seed").to_pylist() == derive_seeds(pa.array(["x", "y"])).to_pylist()


def test_a_file_its_format_cannot_read_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"prompt": "not an array"}')
    with pytest.raises(ManifestError, match=r"m\.json: not a readable json file \(expected a JSON array of objects"):
        _plan(str(tmp_path / "m.json"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("#")
    with pytest.raises(ManifestError, match=r"matches no manifest files \(Parquet, CSV"):
        _plan(str(tmp_path / "empty"), tmp_path / "out")


def test_a_csv_manifest_on_s3(tmp_path: Path, s3_bucket: str, s3_env: dict[str, str]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.pipe(f"{s3_bucket}/prompts/m.csv", b"prompt\na red car\na blue car\n")
    job = _plan(f"s3://{s3_bucket}/prompts/", tmp_path / "out")
    read = pa.concat_tables(iter_pending(job.manifest, None))
    assert read.column("prompt").to_pylist() == ["a red car", "a blue car"] and job.pending_rows == 2

"""Manifests in the formats people keep prompts in (`plan.formats`): CSV, TSV, JSON Lines, JSON
arrays, plain text and a `datasets` folder of Arrow files, planned, validated and read as Parquet
is, with seeds derived from ids where a manifest has none; `manifest_format` for files whose
extension says otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet
import pytest

from pipeline.core.config import build_config, load_config
from pipeline.core.errors import BadRows, ManifestError
from pipeline.plan.job import plan_job, raise_for_bad_rows
from pipeline.plan.manifest import derive_ids, derive_seeds
from pipeline.plan.rows import iter_pending

ROWS = [
    {"id": "a", "prompt": "a red car", "seed": 1},
    {"id": "b", "prompt": "", "seed": 2},  # bad: an empty prompt
    {"id": "c", "prompt": "a blue car", "seed": 3},
]


def _write(folder: Path, kind: str, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        path = folder / "m.parquet"
        pa.parquet.write_table(pa.Table.from_pylist(rows), path)
    elif kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        cell = lambda v: "" if v is None else str(v)  # noqa: E731
        lines = [sep.join(rows[0])] + [sep.join(cell(v) for v in row.values()) for row in rows]
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


def _plan(manifest: str, output: Path, **config: Any) -> Any:
    return plan_job(build_config({"manifest": manifest, "output": str(output), "on_bad_row": "skip", **config}))


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


BAD: list[dict[str, Any]] = [
    {"id": "a", "prompt": "a red car", "seed": 1, "width": 64},
    {"id": "b", "prompt": None, "seed": 2, "width": 64},  # a missing prompt
    {"id": "c", "prompt": "a blue car", "seed": 3.5, "width": 64},  # a seed that is not an integer
    {"id": "d", "prompt": "a green car", "seed": 4, "width": 65},  # a width that is not a multiple of 8
    {"id": "e", "prompt": "a white car", "seed": 5, "width": 128},
]


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "jsonl", "json", "arrow"])
def test_bad_rows_are_named_with_file_row_column_and_reason_in_every_format(tmp_path: Path, kind: str) -> None:
    manifest = _write(tmp_path / "m", kind, BAD)
    job = _plan(str(manifest), tmp_path / "out")
    uri = job.manifest.files[0]
    assert job.manifest.problem_lines() == [
        f"file {uri}, row 1, column 'prompt' (id 'b'): prompt is missing (null)",
        f"file {uri}, row 2, column 'seed' (id 'c'): seed is not an integer (got 3.5)",
        f"file {uri}, row 3, column 'width' (id 'd'): width must be a multiple of 8 (got 65)",
    ]
    assert pending_ids_of(job) == ["a", "e"] and job.pending_rows == 2
    failing = _plan(str(manifest), tmp_path / "out", on_bad_row="fail")
    with pytest.raises(BadRows, match=r"(?s)3 bad row\(s\).*row 1, column 'prompt'.*row 3, column 'width'"):
        raise_for_bad_rows(failing)


def pending_ids_of(job: Any) -> list[str]:
    return [i for table in iter_pending(job.manifest, None) for i in table.column("id").to_pylist()]


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("csv", "prompt,seed\na,1\nb,2\nc,x7\n", r"row 2, column 'seed': seed is not a number \(got 'x7'; 1 row "),
        ("tsv", "prompt\twidth\na\t64\nb\twide\n", r"row 1, column 'width': width is not a number \(got 'wide'"),
        ("jsonl", '{"prompt": "a", "seed": 1}\n{"prompt": "b", "seed": "x"}\n', r"row 1, column 'seed': seed is not a"),
        ("jsonl", '{"prompt": "a"}\n\n{"prompt": "b",\n', r"row 1: line 3 is not JSON"),
        (
            "json",
            '[{"prompt": "a", "seed": 1}, {"prompt": {"en": "b"}, "seed": 2}]',
            r"row 1, column 'prompt': expected",
        ),
        ("json", '[{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": true}]', r"row 1, column 'seed': expected a"),
        ("json", '[{"prompt": "a", "n": 1}, {"prompt": "b", "n": "x"}]', r"row 1, column 'n': expected a number"),
    ],
)
def test_a_value_its_column_cannot_hold_names_file_row_and_column(
    tmp_path: Path, kind: str, data: str, message: str
) -> None:
    """Text in a number column makes the whole column text (a structural problem, as a Parquet
    column of the wrong type is): the error names the first such row."""
    path = tmp_path / f"m.{kind}"
    path.write_text(data)
    with pytest.raises(ManifestError, match=rf"file {path}, {message}"):
        _plan(str(path), tmp_path / "out")


def test_numbers_written_as_text_are_numbers(tmp_path: Path) -> None:
    """JSON numbers in strings, CSV numbers with spaces: read as numbers, and checked as any."""
    (tmp_path / "m.jsonl").write_text('{"prompt": "a", "seed": "7", "width": "64"}\n{"prompt": "b", "seed": " 8 "}\n')
    read = pa.concat_tables(iter_pending(_plan(str(tmp_path / "m.jsonl"), tmp_path / "out").manifest, None))
    assert read.column("seed").to_pylist() == [7, 8] and read.column("width").to_pylist() == [64, None]


def test_manifest_format_reads_a_file_whatever_its_extension(tmp_path: Path) -> None:
    """A `.txt` file that holds CSV is read as text by its extension (its header is a prompt), as CSV
    with `manifest_format: csv`; ids derive from the path, whatever the format."""
    path = tmp_path / "prompts.txt"
    path.write_text("prompt,seed\na red car,7\na blue car,8\n")
    as_text = pa.concat_tables(iter_pending(_plan(str(path), tmp_path / "o1").manifest, None))
    assert as_text.column("prompt").to_pylist() == ["prompt,seed", "a red car,7", "a blue car,8"]
    job = _plan(str(path), tmp_path / "o2", manifest_format="csv")
    as_csv = pa.concat_tables(iter_pending(job.manifest, None))
    assert as_csv.column("prompt").to_pylist() == ["a red car", "a blue car"]
    assert as_csv.column("seed").to_pylist() == [7, 8]
    assert (
        as_csv.column("id").to_pylist()
        == as_text.column("id").to_pylist()[:2]
        == derive_ids("prompts.txt", 0, 2).to_pylist()
    )
    assert job.summary_lines()[0].startswith(f"manifest   {path} (manifest_format: csv): 1 file, 2 rows")
    (tmp_path / "prompts").write_text('{"prompt": "a lighthouse"}\n{"prompt": "a fox"}\n')  # no extension
    read = pa.concat_tables(
        iter_pending(_plan(str(tmp_path / "prompts"), tmp_path / "o3", manifest_format="jsonl").manifest, None)
    )
    assert read.column("prompt").to_pylist() == ["a lighthouse", "a fox"]
    assert read.column("id").to_pylist() == ["prompts-000000000", "prompts-000000001"]


def test_manifest_format_in_a_folder_takes_its_files_of_that_format_or_without_extension(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "part-00000").write_text("prompt\na red car\n")
    (folder / "part-00001.csv").write_text("prompt\na blue car\n")
    (folder / "README.md").write_text("# prompts exported by the nightly job\n")
    (folder / "_SUCCESS").write_text("")
    job = _plan(str(folder), tmp_path / "out", manifest_format="csv")
    assert [f.rsplit("/", 1)[1] for f in job.manifest.files] == ["part-00000", "part-00001.csv"]
    assert pa.concat_tables(iter_pending(job.manifest, None)).column("prompt").to_pylist() == [
        "a red car",
        "a blue car",
    ]
    assert [f.rsplit("/", 1)[1] for f in _plan(str(folder), tmp_path / "o2").manifest.files] == ["part-00001.csv"]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("prompt\na\n")
    with pytest.raises(
        ManifestError,
        match=r"matches no CSV files \(manifest_format: csv: in a folder, the files named `\.csv` or without an "
        r"extension; a glob such as .*/txt/\*\.txt",
    ):
        _plan(str(tmp_path / "txt"), tmp_path / "out", manifest_format="csv")
    job = _plan(str(tmp_path / "txt" / "*.txt"), tmp_path / "out", manifest_format="csv")
    assert job.pending_rows == 1


WRONG_FORMAT = [  # (file, content, manifest_format, what the error says after "file F")
    ("m.csv", "prompt,seed\na,1\n", "parquet", r": not a readable Parquet file \(.*\); re-export it, or check its "
     r"format \(manifest_format: parquet\)"),
    ("m.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n', "json", r": not a readable json file \(.*\); check its format "
     r"\(manifest_format: json\)"),
    ("prompts", "prompt\na\n", "auto", r": not a readable Parquet file \(.*\); re-export it, or check its format "
     r"\(no manifest extension, so read as Parquet; set manifest_format for another format\)"),
    ("m.parquet.csv", "a,b\n1,2\n", "auto", r", column 'prompt': required column is missing \(found columns: a, b\); "
     r".* \(read as CSV, chosen by its extension; set manifest_format if it holds another format\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "chosen", "message"), WRONG_FORMAT)
def test_a_file_read_in_the_wrong_format_names_the_file_and_the_format_tried(
    tmp_path: Path, name: str, data: str, chosen: str, message: str
) -> None:
    (tmp_path / name).write_text(data)
    with pytest.raises(ManifestError, match=rf"file {tmp_path / name}{message}"):
        _plan(str(tmp_path / name), tmp_path / "out", manifest_format=chosen)


def test_manifest_format_is_a_top_level_key_with_known_values(tmp_path: Path) -> None:
    config = load_config(None, manifest="m", output="o", overrides=["manifest_format=tsv"])
    assert config.manifest_format == "tsv" and build_config({"manifest": "m", "output": "o"}).manifest_format == "auto"
    with pytest.raises(
        Exception, match=r"manifest_format \(from --set manifest_format=\.\.\.\): Input should be 'auto', 'parquet'"
    ):
        load_config(None, manifest="m", output="o", overrides=["manifest_format=xlsx"])


def test_formats_with_bad_rows_and_manifest_format_on_s3(
    tmp_path: Path, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    """On S3 as on disk: bad rows named with the object's URI, a JSON Lines object without an
    extension read with `manifest_format` (and with two images per prompt), a TSV object by its
    extension."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.pipe(f"{s3_bucket}/m/a.tsv", b"id\tprompt\tseed\na\ta red car\t1\nb\t\t2\nc\ta blue car\t2.5\n")
    job = _plan(f"s3://{s3_bucket}/m/", tmp_path / "out")
    assert job.manifest.problem_lines() == [
        f"file s3://{s3_bucket}/m/a.tsv, row 1, column 'prompt' (id 'b'): prompt is missing (null)",
        f"file s3://{s3_bucket}/m/a.tsv, row 2, column 'seed' (id 'c'): seed is not an integer (got 2.5)",
    ]
    assert pending_ids_of(job) == ["a"]
    fs.pipe(f"{s3_bucket}/n/part-0", b'{"prompt": "a fox", "seed": 2}\n{"prompt": "an owl", "seed": 3}\n')
    fs.pipe(f"{s3_bucket}/n/notes.md", b"# not prompts")
    job = _plan(f"s3://{s3_bucket}/n/", tmp_path / "out2", manifest_format="jsonl")
    read = pa.concat_tables(iter_pending(job.manifest, None))
    assert read.column("id").to_pylist() == ["part-0-000000000", "part-0-000000001"]
    assert read.column("seed").to_pylist() == [2, 3] and job.manifest.files == [f"s3://{s3_bucket}/n/part-0"]
    job = _plan(f"s3://{s3_bucket}/n/", tmp_path / "out2", manifest_format="jsonl", images_per_prompt=2)
    read = pa.concat_tables(iter_pending(job.manifest, None))
    assert read.column("id").to_pylist() == [
        "part-0-000000000", "part-0-000000000-1", "part-0-000000001", "part-0-000000001-1",
    ]  # fmt: skip
    assert read.column("seed").to_pylist() == [2, 3, 3, 4]
    fs.pipe(f"{s3_bucket}/w/m.json", b'{"prompt": "not an array"}')
    with pytest.raises(
        ManifestError, match=rf"file s3://{s3_bucket}/w/m.json: not a readable json file \(expected a JSON array"
    ):
        _plan(f"s3://{s3_bucket}/w/m.json", tmp_path / "out3")


def test_a_folder_saved_by_datasets_save_to_disk(tmp_path: Path) -> None:
    """The folder `datasets.Dataset.save_to_disk` writes (Arrow files beside its metadata); a
    DatasetDict's folder holds one per split, and the job takes one split, named."""
    import datasets

    table = datasets.Dataset.from_list(
        [{"prompt": "a fox", "seed": 1, "style": "ink"}, {"prompt": "an owl", "seed": 2, "style": "oil"}]
    )
    table.save_to_disk(str(tmp_path / "ds"))
    read = pa.concat_tables(iter_pending(_plan(str(tmp_path / "ds"), tmp_path / "out").manifest, None))
    assert read.select(["id", "prompt", "seed", "style"]).to_pylist() == [
        {"id": "data-00000-of-00001-000000000", "prompt": "a fox", "seed": 1, "style": "ink"},
        {"id": "data-00000-of-00001-000000001", "prompt": "an owl", "seed": 2, "style": "oil"},
    ]
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        ManifestError,
        match=r"is a `datasets` DatasetDict folder \(its splits: test, train\): point the manifest at one split's "
        r"folder, e.g. .*/dd/test",
    ):
        _plan(str(tmp_path / "dd"), tmp_path / "out")
    assert _plan(str(tmp_path / "dd" / "train"), tmp_path / "out2").pending_rows == 2

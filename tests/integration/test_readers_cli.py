"""Real outputs of `sdxl-batch run`, read by the libraries people feed them to, after the worst
case for readers: the job killed between a tar and its metadata part, then resumed with another
`rows_per_part`, on local disk and on S3 (moto). The manifest has two files whose pass-through
columns disagree and ids with dots, uppercase, slashes, unicode and trailing dots.

Before: the killed part's tar stayed in `shards/` for ever, `verify` said `orphan images: 0 … OK`,
and every reader that globbed `shards/*.tar` read its rows twice.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_cli, write_config

pytestmark = pytest.mark.integration

INJECT = Path(__file__).with_name("inject")
README = Path(__file__).resolve().parents[2] / "README.md"
IDS_A = ["img.0001", "img.0002", "v1.5-000010", "UPPER.Case", "dot.", "x-05", "x-06", "x-07"]
IDS_B = ["a/b/c", "ünïcødé-名前", "x..y", "plain-id", ".hidden", "UPPER", "y-1", "y-2"]
IDS = IDS_A + IDS_B


def _manifest_files() -> dict[str, bytes]:
    """`note` only in a.parquet, `score` int32 there and float64 in b.parquet, `tag` only in b."""
    files = {}
    for name, table in (
        ("a.parquet", pa.table({
            "id": IDS_A, "prompt": [f"a red cube, {i}" for i in IDS_A], "seed": range(8), "note": ["first"] * 8,
            "score": pa.array(range(8), pa.int32()),
        })),
        ("b.parquet", pa.table({
            "id": IDS_B, "prompt": [f"a red cube, {i}" for i in IDS_B], "seed": range(8, 16), "score": [0.5] * 8,
            "tag": ["t"] * 8,
        })),
    ):  # fmt: skip
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        files[name] = buffer.getvalue()
    return files


def _job(tmp_path: Path, model_cache: Path, manifest: str, output: str) -> Path:
    return write_config(
        tmp_path / "job.yaml",
        manifest=manifest,
        output=output,
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"layout": "webdataset", "rows_per_part": 4},
    )


def _killing(tmp_path: Path, *, at_commit: int, during: bool = False) -> dict[str, str]:
    """The environment that kills the job at its `at_commit`-th part (inject/sitecustomize.py)."""
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "SDXL_BATCH_TEST_KILL_AT_COMMIT": str(at_commit),
        "SDXL_BATCH_TEST_KILL_MARKS": str(tmp_path / "commit"),
    }
    return env | ({"SDXL_BATCH_TEST_KILL_DURING": "1"} if during else {})


def _webdataset_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("### Reading the output", 1)[1].split("\n### ", 1)[0]
    snippets: list[str] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return next(s for s in snippets if "webdataset" in s)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_between_a_tar_and_its_metadata_then_resumed(
    where: str, tmp_path: Path, model_cache: Path, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {}
    if where == "s3":
        import s3fs

        env = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        fs: Any = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
        manifest, output = f"s3://{bucket}/manifests/", f"s3://{bucket}/renders/run-1"
        root = f"{bucket}/renders/run-1"
    else:
        from fsspec.implementations.local import LocalFileSystem

        fs = LocalFileSystem(auto_mkdir=True)
        manifest, output = str(tmp_path / "manifests"), str(tmp_path / "out")
        root = output
    for name, data in _manifest_files().items():
        fs.pipe(f"{manifest.removeprefix('s3://').rstrip('/')}/{name}", data)
    config = _job(tmp_path, model_cache, manifest, output)
    killed = run_cli("run", str(config), "--no-progress", env=env | _killing(tmp_path, at_commit=2))
    assert killed.returncode == -9, killed.stdout + killed.stderr  # the driver, SIGKILLed
    assert (tmp_path / "commit.2").exists()

    committed = pads.dataset(f"{root}/metadata", format="parquet", filesystem=fs).to_table()
    assert 0 < committed.num_rows < len(IDS)
    listed = set(committed.column("image_path").to_pylist())
    globbed = {p.removeprefix(root + "/") for p in fs.glob(f"{root}/shards/*.tar")}
    # The killed part's tar, and that of any other write task caught between its tar and its
    # metadata: globbing readers would read their rows twice.
    orphans = len(globbed - listed)
    assert orphans >= 1
    before = run_cli("verify", output, env=env)
    assert before.returncode == 0, before.stdout + before.stderr
    # (a write task of the killed driver's Ray may still be finishing: as many or more by now)
    tars = re.search(r"orphans: +\d+ \(0 images, (\d+) tars, \d+ stats records", before.stdout)
    assert tars and int(tars.group(1)) >= orphans, before.stdout

    resumed = run_cli("run", str(config), "--no-progress", "--set", "write.rows_per_part=3", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed: {committed.num_rows} of {len(IDS)} rows were already done" in resumed.stdout
    after = run_cli("verify", output, "--manifest", manifest, env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "orphans:          0 (" in after.stdout and "OK: every row exactly once" in after.stdout

    # The shard list is the committed tars, which are now all the tars there are.
    fs.invalidate_cache()  # s3fs caches listings: ours predate the resumed run
    table = pads.dataset(f"{root}/metadata", format="parquet", filesystem=fs).to_table()
    shards = fs.cat(f"{root}/shards.txt").decode().split()
    assert shards == sorted(set(table.column("image_path").to_pylist()))
    assert {p.removeprefix(root + "/") for p in fs.glob(f"{root}/shards/*.tar")} == set(shards)
    assert sorted(table.column("id").to_pylist()) == sorted(IDS)
    schemas = _part_schemas(fs, root)
    assert all(schema.equals(schemas[0]) for schema in schemas) and len(schemas) >= 5
    assert table.schema.field("score").type == pa.float64() and table.column("note").null_count == 8

    # webdataset, through the docs' snippet: one sample per row, keys without dots, captions.
    namespace: dict[str, Any] = {"OUTPUT": output}
    exec(compile(_webdataset_snippet(), "README.md", "exec"), namespace)
    samples = namespace["samples"]
    assert sorted(meta["id"] for _, _, meta in samples) == sorted(IDS)
    for image, caption, meta in samples:
        assert image.size == (64, 64) and caption == f"a red cube, {meta['id']}" and "." not in meta["key"]

    import pandas as pd
    import polars as pl

    assert sorted(pd.read_parquet(f"{output}/metadata")["id"]) == sorted(IDS)
    options = _polars_options(env) if where == "s3" else None
    frame = pl.read_parquet(f"{output}/metadata/*.parquet", storage_options=options)
    assert frame.height == len(IDS) and frame.schema["score"] == pl.Float64
    if where == "local":  # DuckDB's S3 support (httpfs) is an extension it downloads; datasets reads local folders
        import duckdb
        from datasets import load_dataset

        relation = duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM '{output}/metadata/*.parquet'")
        assert relation is not None and relation.fetchall() == [(len(IDS), len(IDS))]
        dataset = load_dataset(output, split="train")
        assert sorted(row["id"] for row in dataset["json"]) == sorted(IDS)
        assert sorted(dataset["txt"]) == sorted(f"a red cube, {i}" for i in IDS)


def _part_schemas(fs: Any, root: str) -> list[pa.Schema]:
    schemas = []
    for path in fs.glob(f"{root}/metadata/*.parquet"):
        with fs.open(path, "rb") as handle:
            schemas.append(pq.read_schema(handle))
    return schemas


def _polars_options(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_endpoint_url": env["AWS_ENDPOINT_URL"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "aws_region": env["AWS_DEFAULT_REGION"],
        "aws_allow_http": "true",
    }


def test_killed_during_its_first_commit_then_resumed(tmp_path: Path, model_cache: Path) -> None:
    """`metadata/` holding only the temporary file of the first part: nothing is done yet. It used
    to stop `validate` and `run` with `ArrowInvalid: No match for FieldRef.Name(id) ...`."""
    manifest, output = tmp_path / "manifests", tmp_path / "out"
    manifest.mkdir()
    for name, data in _manifest_files().items():
        (manifest / name).write_bytes(data)
    config = _job(tmp_path, model_cache, str(manifest), str(output))
    killed = run_cli("run", str(config), "--no-progress", env=_killing(tmp_path, at_commit=1, during=True))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    leftovers = [p.name for p in (output / "metadata").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part-") and leftovers[0].endswith(".tmp")

    validated = run_cli("validate", str(config))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert f"to render  {len(IDS)} rows" in validated.stdout and "done" not in validated.stdout
    resumed = run_cli("run", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Rendered {len(IDS)} images" in resumed.stdout
    after = run_cli("verify", str(output), "--manifest", str(manifest))
    assert after.returncode == 0, after.stdout + after.stderr
    assert "orphans:          0 (" in after.stdout  # the half-written part and its tar are gone

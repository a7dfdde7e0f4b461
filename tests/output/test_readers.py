"""The output read by the libraries people feed it to: webdataset, Hugging Face datasets, DuckDB,
Polars, pandas and pyarrow, as installed (dev dependencies), with nothing but what they document.

The outputs are made by the real writer and end-of-job step (`PartWriter`, `publish`) from two
manifest files whose pass-through columns disagree (planned by the real planner), with ids that
broke the readers before: dots, uppercase, slashes, unicode, trailing dots. The whole job through
the CLI (with a kill between a tar and its metadata part, and S3) is in
tests/integration/test_readers_cli.py. The snippets of README.md's "Reading the output" are
run here as written.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.errors import ManifestError
from pipeline.core.io import filesystem
from pipeline.core.layout import metadata_schema
from pipeline.output.publish import publish
from pipeline.output.writer import ModelInfo, PartWriter
from tests.helpers import plan_manifest

REPO = Path(__file__).resolve().parents[2]
# Ids that webdataset readers split or lowercase, and the ones no file name can hold as they are.
IDS_A = ["img.0001", "img.0002", "v1.5-000010", "UPPER.Case", "dot."]
IDS_B = ["a/b/c", "ünïcødé-名前", "x..y", "plain-id", ".hidden", "UPPER"]
IDS = IDS_A + IDS_B


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 20 % 256, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def _encoded(ids: list[str], passthrough: dict[str, pa.Array], start: int) -> pa.Table:
    """A batch as the encode stage hands it to the writer."""
    n = len(ids)
    images = [_png(start + i) for i in range(n)]
    return pa.table({
        "id": ids, "prompt": [f"a photo of {i}" for i in ids], "negative_prompt": pa.nulls(n, pa.string()),
        "seed": list(range(start, start + n)), "width": pa.array([8] * n, pa.int32()),
        "height": pa.array([8] * n, pa.int32()), "steps": pa.array([4] * n, pa.int32()),
        "guidance_scale": [0.0] * n, **passthrough,
        "image": pa.array(images, pa.large_binary()), "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "bytes": [len(b) for b in images], "generation_seconds": [0.5] * n, "encode_seconds": [0.1] * n,
        "peak_memory_mb": [1.0] * n, "node": ["node-1"] * n, "actor": ["actor-1"] * n,
    })  # fmt: skip


def _manifests(folder: Path) -> tuple[Path, pa.Schema]:
    """Two files that disagree: `note` only in the first, `score` int32 then float64, `tag` only
    in the second. The first file's rows have nulls in `tag`, so a reader that types the json
    from the first samples would type it null."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({
            "id": IDS_A, "prompt": ["p"] * 5, "seed": [1] * 5, "note": ["first"] * 5,
            "score": pa.array(range(5), pa.int32()),
        }),
        folder / "a.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"id": IDS_B, "prompt": ["p"] * 6, "seed": [1] * 6, "score": [0.5] * 6, "tag": ["t"] * 6}),
        folder / "b.parquet",
    )
    return folder, plan_manifest(str(folder)).passthrough


def _make_output(root: Path, layout: str) -> Path:
    _, passthrough = _manifests(root / "manifest")
    assert passthrough == pa.schema([("note", pa.string()), ("score", pa.float64()), ("tag", pa.string())])
    output = root / f"out-{layout}"
    writer = PartWriter(
        output=str(output),
        layout=layout,
        image_format="png",
        model=ModelInfo("tiny", "Euler"),
        schema=metadata_schema(passthrough),
    )
    writer.write(_encoded(IDS_A, {"note": pa.array(["first"] * 5), "score": pa.array(range(5), pa.int32())}, 0))
    writer.write(_encoded(IDS_B, {"score": pa.array([0.5] * 6), "tag": pa.array(["t"] * 6)}, 5))
    fs, path = filesystem(str(output))
    published = publish(fs, path, layout=layout, image_format="png", captions=True)
    assert published is not None and published.rows == len(IDS)
    return output


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readers")
    return {layout: _make_output(root, layout) for layout in ("files", "webdataset")}


def _expected_pixels(row_id: str) -> tuple[int, int, int]:
    index = IDS.index(row_id)
    return (index * 20 % 256, 0, 0)


def test_webdataset_reads_one_sample_per_row(outputs: dict[str, Path]) -> None:
    import webdataset as wds

    output = outputs["webdataset"]
    shards = [str(output / line) for line in (output / "shards.txt").read_text().split()]
    assert shards == sorted(shards) and len(shards) == 2
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == len(IDS)
    by_id = {sample["json"]["id"]: sample for sample in samples}
    assert sorted(by_id) == sorted(IDS)
    for row_id, sample in by_id.items():
        assert set(sample) == {"__key__", "__url__", "__local_path__", "png", "json", "txt"}
        assert sample["__key__"] == sample["json"]["key"] and "." not in sample["__key__"]
        assert sample["txt"] == f"a photo of {row_id}"
        assert sample["png"].getpixel((0, 0)) == _expected_pixels(row_id)
        assert set(sample["json"]) == set(metadata_schema(pa.schema([])).names) | {"note", "score", "tag"}
    assert by_id["UPPER"]["__key__"] == "UPPER" and by_id["plain-id"]["__key__"] == "plain-id"


def test_hugging_face_webdataset_uses_the_cards_types(outputs: dict[str, Path], tmp_path: Path) -> None:
    """The card declares every feature: the loader does not guess from the first samples, whose
    `tag` is null (without the card it fails, as huggingface/datasets#7549 reports)."""
    from datasets import load_dataset

    output = outputs["webdataset"]
    dataset = load_dataset(str(output), split="train", cache_dir=str(tmp_path / "with-card"))
    assert dataset.num_rows == len(IDS)
    assert sorted(row["id"] for row in dataset["json"]) == sorted(IDS)
    assert dataset.features["json"]["score"].dtype == "float64"
    assert dataset.features["json"]["tag"].dtype == "string"
    first = dataset[0]
    assert first["png"].size == (8, 8) and first["txt"] == f"a photo of {first['json']['id']}"
    shards = [str(output / line) for line in (output / "shards.txt").read_text().split()]
    with pytest.raises(Exception) as info:
        load_dataset("webdataset", data_files=shards, split="train", cache_dir=str(tmp_path / "guessing"))
    assert "Couldn't cast" in str(info.value.__cause__) and "null" in str(info.value.__cause__)


def test_hugging_face_imagefolder_reads_images_with_metadata(outputs: dict[str, Path], tmp_path: Path) -> None:
    from datasets import load_dataset

    dataset = load_dataset(str(outputs["files"]), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == len(IDS)
    assert "label" not in dataset.features  # no class labels invented from the shard folders
    assert list(dataset.features)[:3] == ["image", "id", "key"]
    assert dataset.features["score"].dtype == "float64"
    for row in dataset:
        assert row["image"].getpixel((0, 0)) == _expected_pixels(row["id"])
    # The same index is what imagefolder looks for without the card.
    plain = load_dataset("imagefolder", data_dir=str(outputs["files"]), split="train", cache_dir=str(tmp_path / "p"))
    assert plain.num_rows == len(IDS) and "label" not in plain.features


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_metadata_globs_read_one_schema(outputs: dict[str, Path], layout: str) -> None:
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    metadata = outputs[layout] / "metadata"
    relation = duckdb.sql(f"SELECT id, score, note, tag FROM '{metadata}/*.parquet' ORDER BY id")
    assert relation is not None
    duck = relation.fetchall()
    assert sorted(r[0] for r in duck) == sorted(IDS)
    scores = {r[0]: r[1] for r in duck}
    assert scores["img.0002"] == 1.0 and scores["a/b/c"] == 0.5  # int32 widened, float kept: no truncation
    polars = pl.read_parquet(f"{metadata}/*.parquet")
    assert polars.height == len(IDS) and polars.schema["score"] == pl.Float64
    pandas = pd.read_parquet(metadata)
    assert len(pandas) == len(IDS) and {"note", "tag", "score"} <= set(pandas.columns)
    table = pads.dataset(metadata, format="parquet").to_table()
    assert table.num_rows == len(IDS) and table.column("note").null_count == len(IDS_B)


def test_incompatible_pass_through_types_stop_planning(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"prompt": ["p"], "seed": [1], "score": pa.array([2**40], pa.int64())}), tmp_path / "a.parquet"
    )
    pq.write_table(pa.table({"prompt": ["p"], "seed": [1], "score": [0.1]}), tmp_path / "b.parquet")
    with pytest.raises(ManifestError) as info:
        plan_manifest(str(tmp_path))
    message = str(info.value)
    assert "a.parquet" in message and "b.parquet" in message and "'score'" in message


# --- The snippets of README.md, as written ---------------------------------------------


def _snippets() -> list[str]:
    page = (REPO / "README.md").read_text(encoding="utf-8")
    section = page.split("### Reading the output", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def _rows(namespace: dict[str, Any]) -> int:
    for name in ("samples", "dataset", "df", "table"):
        if name in namespace:
            value = namespace[name]
            return int(value.num_rows) if hasattr(value, "num_rows") else len(value)
    raise AssertionError(f"the snippet defines none of samples, dataset, df, table: {sorted(namespace)}")


def test_the_docs_have_a_snippet_per_library() -> None:
    imports = " ".join(_snippets())
    for library in ("webdataset", "datasets", "duckdb", "polars", "pandas", "pyarrow"):
        assert re.search(rf"\b(import|from) {library}\b", imports), library


# Every snippet on both layouts, but webdataset's (it reads tars).
CASES = [(layout, i) for i, s in enumerate(_snippets()) for layout in ("files", "webdataset") if
         layout == "webdataset" or "import webdataset" not in s]  # fmt: skip


@pytest.mark.parametrize(("layout", "index"), CASES)
def test_docs_snippet_runs(outputs: dict[str, Path], layout: str, index: int) -> None:
    snippet = _snippets()[index]
    namespace: dict[str, Any] = {"OUTPUT": str(outputs[layout])}
    exec(compile(snippet, f"README.md snippet {index}", "exec"), namespace)
    assert _rows(namespace) == len(IDS)


def test_tar_members_split_into_one_sample_per_row(outputs: dict[str, Path]) -> None:
    """webdataset's own rule (`base_plus_ext`): the key is the member name up to its first dot."""
    names: list[str] = []
    for tar_path in sorted((outputs["webdataset"] / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names += tar.getnames()
    keys = {name.split(".", 1)[0] for name in names}
    assert len(keys) == len(IDS) and len(names) == 3 * len(IDS)
    assert {name.split(".", 1)[1] for name in names} == {"png", "json", "txt"}

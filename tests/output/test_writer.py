from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.layout import metadata_schema, part_name
from pipeline.output.writer import ModelInfo, PartWriter


def _encoded_batch(ids: list[str]) -> pa.Table:
    images = [f"image-of-{i}".encode() for i in ids]
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "prompt": [f"prompt {i}" for i in ids],
            "negative_prompt": pa.nulls(n, pa.string()),
            "seed": list(range(n)),
            "width": [8] * n,
            "height": [8] * n,
            "steps": [4] * n,
            "guidance_scale": [0.0] * n,
            "note": ["pass-through"] * n,
            "image": pa.array(images, pa.large_binary()),
            "sha256": [hashlib.sha256(b).hexdigest() for b in images],
            "bytes": [len(b) for b in images],
            "generation_seconds": [0.5] * n,
            "encode_seconds": [0.1] * n,
            "peak_memory_mb": [100.0] * n,
            "node": ["node-1"] * n,
            "actor": ["actor-1"] * n,
        }
    )


def _writer(output: Path, layout: str) -> PartWriter:
    return PartWriter(output=str(output), layout=layout, image_format="png", model=ModelInfo("tiny", "Euler"))


def test_part_name_depends_on_the_ids_not_their_order() -> None:
    assert part_name(["b", "a"]) == part_name(["a", "b"])
    assert part_name(["a"]) != part_name(["a", "b"])


def test_files_layout(tmp_path: Path) -> None:
    ids = ["x-1", "../escape", "y-2"]
    summary = _writer(tmp_path, "files").write(_encoded_batch(ids))
    assert summary.rows == 3 and summary.generation_seconds == pytest.approx(1.5)
    parts = list((tmp_path / "metadata").glob("part-*.parquet"))
    assert [p.stem for p in parts] == [part_name(ids)]
    table = pq.read_table(parts[0])
    assert table.schema == metadata_schema(pa.schema([("note", pa.string())]))  # fixed columns, then the manifest's
    assert "image" not in table.column_names
    for row in table.to_pylist():
        data = (tmp_path / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert row["model"] == "tiny" and row["tar_member"] is None
    assert not (tmp_path.parent / "escape.png").exists()
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary left by write_bytes


def test_rewriting_a_part_is_idempotent(tmp_path: Path) -> None:
    writer = _writer(tmp_path, "files")
    writer.write(_encoded_batch(["a", "b"]))
    writer.write(_encoded_batch(["b", "a"]))
    assert len(list((tmp_path / "metadata").iterdir())) == 1


def test_webdataset_layout(tmp_path: Path) -> None:
    ids = ["x-1", "y-2"]
    _writer(tmp_path, "webdataset").write(_encoded_batch(ids))
    table = pq.read_table(next((tmp_path / "metadata").glob("*.parquet")))
    rows = table.to_pylist()
    assert {r["image_path"] for r in rows} == {f"shards/{part_name(ids)}.tar"}
    with tarfile.open(tmp_path / rows[0]["image_path"]) as tar:
        names = tar.getnames()
        assert names == ["x-1.png", "x-1.json", "x-1.txt", "y-2.png", "y-2.json", "y-2.txt"]
        assert tar.extractfile("y-2.txt").read() == b"prompt y-2"  # type: ignore[union-attr]
        for row in rows:
            member = tar.extractfile(row["tar_member"])
            assert member is not None
            assert hashlib.sha256(member.read()).hexdigest() == row["sha256"]
        sidecar = json.load(io.BytesIO(tar.extractfile("x-1.json").read()))  # type: ignore[union-attr]
        assert sidecar["prompt"] == "prompt x-1" and sidecar["note"] == "pass-through"
        assert sidecar["key"] == "x-1" and sidecar.keys() == set(table.column_names)


def test_captions_can_be_switched_off(tmp_path: Path) -> None:
    writer = PartWriter(
        output=str(tmp_path), layout="webdataset", image_format="png", model=ModelInfo("tiny", "Euler"), captions=False
    )
    writer.write(_encoded_batch(["a"]))
    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        assert tar.getnames() == ["a.png", "a.json"]


def test_parts_take_the_planned_schema(tmp_path: Path) -> None:
    """A batch without a planned column gets it as typed nulls; a narrower type is widened; ids
    with dots get dot-free keys (webdataset splits member names at the first dot)."""
    planned = metadata_schema(pa.schema([("note", pa.large_string()), ("score", pa.float64())]))
    writer = PartWriter(
        output=str(tmp_path), layout="webdataset", image_format="png", model=ModelInfo("tiny", "Euler"), schema=planned
    )
    writer.write(_encoded_batch(["img.0001", "UPPER.Case"]))
    table = pq.read_table(next((tmp_path / "metadata").glob("*.parquet")))
    assert table.schema == planned
    assert table.column("score").null_count == 2
    keys = table.column("key").to_pylist()
    assert all("." not in key for key in keys) and len(set(keys)) == 2
    assert table.column("tar_member").to_pylist() == [f"{key}.png" for key in keys]

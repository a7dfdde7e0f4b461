from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.layout import part_name
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
    assert table.column_names[:3] == ["id", "prompt", "negative_prompt"]
    assert "note" in table.column_names and "image" not in table.column_names
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
        assert names == ["x-1.png", "x-1.json", "y-2.png", "y-2.json"]
        for row in rows:
            member = tar.extractfile(row["tar_member"])
            assert member is not None
            assert hashlib.sha256(member.read()).hexdigest() == row["sha256"]
        sidecar = json.load(io.BytesIO(tar.extractfile("x-1.json").read()))  # type: ignore[union-attr]
        assert sidecar["prompt"] == "prompt x-1" and sidecar["note"] == "pass-through"

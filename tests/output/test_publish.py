"""The end-of-job step at scale: the imagefolder index in large row groups, image orphans found
folder by folder, and a dataset card that names the tars by a glob once they are too many."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.io import filesystem
from pipeline.output import publish as publish_module
from pipeline.output.publish import publish
from pipeline.output.writer import ModelInfo, PartWriter
from tests.output.test_writer import _encoded_batch

IDS = [f"id-{i:02d}" for i in range(20)]


def _output(path: Path, layout: str) -> Path:
    writer = PartWriter(output=str(path), layout=layout, image_format="png", model=ModelInfo("tiny", "Euler"))
    for start in range(0, len(IDS), 4):
        writer.write(_encoded_batch(IDS[start : start + 4]))
    return path


def _card(output: Path) -> dict[str, object]:
    front = (output / "README.md").read_text().split("---\n")[1]
    card: dict[str, object] = yaml.safe_load(front)
    return card


def test_files_index_in_few_row_groups_and_image_orphans_removed(tmp_path: Path) -> None:
    output = _output(tmp_path / "out", "files")
    folder = next((output / "images").iterdir())
    (folder / "orphan.png").write_bytes(b"from an interrupted part")
    (output / "images" / "loose.png").write_bytes(b"from an older layout")
    fs, root = filesystem(str(output))
    published = publish(fs, root, layout="files", image_format="png", captions=True)
    assert published is not None and published.rows == len(IDS) and published.shards == 0
    assert sorted(published.orphans.images) == sorted([f"images/{folder.name}/orphan.png", "images/loose.png"])
    assert not (folder / "orphan.png").exists() and len(list((output / "images").rglob("*.png"))) == len(IDS)
    index = pq.ParquetFile(output / "metadata.parquet")
    assert index.metadata.num_row_groups == 1 and index.metadata.num_rows == len(IDS)  # not one per part
    assert sorted(index.read(columns=["id"]).column("id").to_pylist()) == IDS


def test_index_row_groups_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_module, "INDEX_ROW_GROUP_ROWS", 8)
    output = _output(tmp_path / "out", "files")
    fs, root = filesystem(str(output))
    assert publish(fs, root, layout="files", image_format="png", captions=True) is not None
    groups = pq.ParquetFile(output / "metadata.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [8, 8, 4]


def test_card_lists_the_tars_then_globs_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = _output(tmp_path / "out", "webdataset")
    fs, root = filesystem(str(output))
    assert publish(fs, root, layout="webdataset", image_format="png", captions=True) is not None
    shards = (output / "shards.txt").read_text().split()
    assert len(shards) == 5 and shards == sorted(shards)
    assert _card(output)["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": shards}]}]
    monkeypatch.setattr(publish_module, "MAX_LISTED_SHARDS", 4)
    published = publish(fs, root, layout="webdataset", image_format="png", captions=True)
    assert published is not None and published.shards == 5
    assert (output / "shards.txt").read_text().split() == shards  # the exact list stays in shards.txt
    paths = _card(output)["configs"][0]["data_files"][0]["path"]  # type: ignore[index]
    assert paths == ["shards/*.tar"]

"""The bounded-memory building blocks of verify, report and publish (output.streaming)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.partition import partition_of
from pipeline.output import streaming
from pipeline.output.streaming import (
    IMAGE_FOLDERS,
    ImageReferences,
    PartitionedSpill,
    bounded_map,
    folder_partition,
    image_folder,
)


def test_bounded_map_keeps_order_and_a_bounded_window() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def work(item: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.001 * (item % 3))
        with lock:
            running -= 1
        return item * 2

    submitted: list[int] = []

    def items() -> Iterator[int]:
        for i in range(200):
            submitted.append(i)
            yield i

    consumed = []
    for result in bounded_map(work, items(), threads=4):
        consumed.append(result)
        assert len(submitted) - len(consumed) <= 8  # at most twice the threads waiting
    assert consumed == [2 * i for i in range(200)] and most <= 4


def test_bounded_map_raises_the_first_error() -> None:
    def work(item: int) -> int:
        if item == 5:
            raise ValueError("part 5 is damaged")
        return item

    with pytest.raises(ValueError, match="part 5"):
        list(bounded_map(work, range(100), threads=4))


def test_spill_puts_each_row_in_its_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "FLUSH_ROWS", 7)
    ids = [f"id-{i}" for i in range(100)] + ["id-3", "id-3"]
    schema = pa.schema([("id", pa.string())])
    spill = PartitionedSpill(
        str(tmp_path), schema, partitions=5, partition_of_rows=lambda t: partition_of(t.column("id"), 5)
    )
    for start in range(0, len(ids), 3):  # small appends, buffered across flushes
        spill.append(pa.table({"id": ids[start : start + 3], "extra": [0] * len(ids[start : start + 3])}))
    spill.close()
    read = {p: spill.read(p).column("id").to_pylist() for p in range(5)}
    assert sorted(i for rows in read.values() for i in rows) == sorted(ids)
    for p, rows in read.items():
        assert set(partition_of(pa.array(rows, pa.string()), 5).tolist()) <= {p}
    assert read[int(partition_of(pa.array(["id-3"]), 5)[0])].count("id-3") == 3
    empty = PartitionedSpill(str(tmp_path / "empty"), schema, partitions=3, partition_of_rows=lambda t: np.zeros(0))
    empty.close()
    assert empty.read(2).num_rows == 0


def test_image_folders() -> None:
    paths = ["images/ab/key.png", "images/ab/deeper/key.png", "images/loose.png", "images/zz/x.png", "top.png"]
    assert [image_folder(p) for p in paths] == ["images/ab", "images/ab", "images", "images/zz", ""]
    assert streaming._image_folders(pa.array(paths)).to_pylist() == [image_folder(p) for p in paths]
    parts = folder_partition(pa.array(["images/00", "images/ff", "images/zz", "images"])).tolist()
    assert parts == [0, 255, len(IMAGE_FOLDERS), len(IMAGE_FOLDERS)]


def test_image_references_by_folder(tmp_path: Path) -> None:
    references = ImageReferences(str(tmp_path))
    references.add(pa.array(["images/00/a.png", "images/ff/b.png", None, "images/zz/c.png", "images/d.png"]))
    references.close()
    groups = {tuple(folders): sorted(paths.to_pylist()) for folders, paths in
              references.by_partition(["images/00", "images/ff", "images/zz", "images", "images/01"])}  # fmt: skip
    assert groups == {
        ("images/00",): ["images/00/a.png"],
        ("images/01",): [],
        ("images/ff",): ["images/ff/b.png"],
        ("images/zz", "images"): ["images/d.png", "images/zz/c.png"],
    }

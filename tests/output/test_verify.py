from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import streaming, verify
from pipeline.output.verify import verify_output
from pipeline.output.writer import ModelInfo, PartWriter
from tests.helpers import write_manifest
from tests.output.test_writer import _encoded_batch


def _output(tmp_path: Path, layout: str = "files") -> Path:
    writer = PartWriter(
        output=str(tmp_path / "out"), layout=layout, image_format="png", model=ModelInfo("tiny", "Euler")
    )
    writer.write(_encoded_batch(["a", "b"]))
    writer.write(_encoded_batch(["c"]))
    return tmp_path / "out"


def test_consistent_output_passes(tmp_path: Path) -> None:
    output = _output(tmp_path)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in "abc"])
    report = verify_output(str(output), manifest=str(manifest))
    assert report.ok, report.summary()
    assert (report.rows, report.parts, report.checked_images, report.orphans.count) == (3, 2, 3, 0)


def test_tampered_missing_and_orphan_images(tmp_path: Path) -> None:
    output = _output(tmp_path)
    images = sorted((output / "images").rglob("*.png"))
    images[0].write_bytes(b"tampered")
    images[1].unlink()
    (output / "images" / "ff").mkdir(exist_ok=True)
    (output / "images" / "ff" / "orphan.png").write_bytes(b"from an interrupted part")
    report = verify_output(str(output))
    assert not report.ok
    text = report.summary()
    assert "image sha256 or size mismatch (1)" in text and "image missing (1)" in text
    assert report.orphans.images == ["images/ff/orphan.png"] and report.orphans.count == 1


def test_duplicates_and_manifest_differences(tmp_path: Path) -> None:
    output = _output(tmp_path)
    PartWriter(output=str(output), layout="files", image_format="png", model=ModelInfo("tiny", "Euler")).write(
        _encoded_batch(["c", "d"])
    )
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in "abe"])
    text = verify_output(str(output), manifest=str(manifest)).summary()
    assert "duplicate id (1): c" in text
    assert "manifest id missing from the output (1): e" in text
    assert "output id not in the manifest (2)" in text


def test_webdataset_members_are_checked(tmp_path: Path) -> None:
    output = _output(tmp_path, layout="webdataset")
    assert verify_output(str(output)).ok
    next((output / "shards").iterdir()).write_bytes(b"not a tar anymore" * 100)
    assert not verify_output(str(output)).ok


def test_empty_output(tmp_path: Path) -> None:
    report = verify_output(str(tmp_path / "nothing"))
    assert not report.ok and "nothing committed" in report.summary()


def test_orphans_of_every_kind_are_counted_and_cleaned(tmp_path: Path) -> None:
    """A tar, a stats record and temporary files that no committed part lists: counted (the
    output is still OK: nothing reads them as output) and removed by `clean`."""
    output = _output(tmp_path, layout="webdataset")
    tars = sorted((output / "shards").iterdir())
    (output / "shards" / "part-0123456789abcdef.tar").write_bytes(tars[0].read_bytes())  # an interrupted part
    (output / "stats" / "part-0123456789abcdef.json").write_text("{}")
    (output / "metadata" / ".part-0123456789abcdef.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"PAR1")
    (output / ".stats.json.0123456789abcdef0123456789abcdef.tmp").write_text("{")
    report = verify_output(str(output))
    assert report.ok, report.summary()
    assert report.orphans.tars == ["shards/part-0123456789abcdef.tar"]
    assert report.orphans.stats == ["stats/part-0123456789abcdef.json"]
    assert len(report.orphans.temporary) == 2 and report.orphans.count == 4
    assert "4 (0 images, 1 tars, 1 stats records, 2 temporary files)" in report.summary()
    assert "verify --clean" in report.summary()
    cleaned = verify_output(str(output), clean=True)
    assert cleaned.cleaned and cleaned.ok
    assert verify_output(str(output)).orphans.count == 0
    assert sorted((output / "shards").iterdir()) == tars  # committed tars stay


def test_parts_with_different_schemas_are_a_problem(tmp_path: Path) -> None:
    output = _output(tmp_path)
    batch = _encoded_batch(["d"])
    PartWriter(output=str(output), layout="files", image_format="png", model=ModelInfo("tiny", "Euler")).write(
        batch.drop_columns(["note"]).append_column("score", pa.array([0.5]))
    )
    report = verify_output(str(output))
    assert not report.ok
    assert "metadata part with another schema than" in report.summary()


def test_orphans_are_counted_when_nothing_is_committed(tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / "shards").mkdir(parents=True)
    (output / "metadata").mkdir()
    (output / "shards" / "part-0123456789abcdef.tar").write_bytes(b"the first part's tar")
    (output / "metadata" / ".part-0123456789abcdef.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"PAR")
    report = verify_output(str(output), clean=True)
    assert not report.ok and "nothing committed yet" in report.summary()
    assert report.orphans.tars == ["shards/part-0123456789abcdef.tar"] and len(report.orphans.temporary) == 1
    assert report.cleaned and not list((output / "shards").iterdir()) and not list((output / "metadata").iterdir())


# The partitioned checks (output.checks): with a partition per two rows, a group of parts per
# task and spills that flush every three, ids, manifest ids and image paths are joined across
# many partitions, tasks and files.


@pytest.fixture
def small_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "ROWS_PER_JOIN", 2)
    monkeypatch.setattr(verify, "MIN_IDS_PER_TABLE", 1)
    monkeypatch.setattr(verify, "MIN_PARTS_PER_TASK", 2)
    monkeypatch.setattr(streaming, "FLUSH_ROWS", 3)


def _parts(output: Path, parts: list[list[str]], layout: str = "files") -> Path:
    writer = PartWriter(output=str(output), layout=layout, image_format="png", model=ModelInfo("tiny", "Euler"))
    for ids in parts:
        writer.write(_encoded_batch(ids))
    return output


IDS = [f"id-{i:02d}" for i in range(30)]


@pytest.mark.usefixtures("small_partitions")
def test_duplicates_across_parts_and_partitions(tmp_path: Path) -> None:
    output = _parts(tmp_path / "out", [IDS[:10], IDS[10:20], IDS[20:], [IDS[3], IDS[15], IDS[29]], [IDS[3]]])
    report = verify_output(str(output))
    assert (report.rows, report.parts, report.checked_images) == (34, 5, 34)
    assert report.problems == [f"duplicate id (3): {IDS[3]}, {IDS[15]}, {IDS[29]}"]


@pytest.mark.usefixtures("small_partitions")
def test_many_problems_are_counted_and_the_first_few_listed(tmp_path: Path) -> None:
    output = _parts(tmp_path / "out", [IDS[:15], IDS[15:]])
    for image in (output / "images").rglob("*.png"):
        image.unlink()
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in IDS[5:]])
    report = verify_output(str(output), manifest=str(manifest))
    assert report.problems == [
        f"image missing (30): {', '.join(IDS[:10])} (+20 more)",
        f"output id not in the manifest (5): {', '.join(IDS[:5])}",
    ]


@pytest.mark.usefixtures("small_partitions")
def test_orphan_images_are_found_folder_by_folder(tmp_path: Path) -> None:
    output = _parts(tmp_path / "out", [IDS[:12], IDS[12:]])
    folders = sorted(p for p in (output / "images").iterdir())
    assert len(folders) > 5  # the ids' images spread over many folders, so many partitions
    (folders[0] / "orphan.png").write_bytes(b"from an interrupted part")
    (folders[-1] / "orphan.png").write_bytes(b"from an interrupted part")
    (folders[-1] / ".orphan.png.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"cut short")
    (output / "images" / "zz").mkdir()
    (output / "images" / "zz" / "odd.png").write_bytes(b"outside the hex folders")
    (output / "images" / "loose.png").write_bytes(b"directly under images/")
    report = verify_output(str(output))
    assert report.ok, report.summary()
    assert report.orphans.images == sorted([
        f"images/{folders[0].name}/orphan.png", f"images/{folders[-1].name}/orphan.png", "images/loose.png",
        "images/zz/odd.png",
    ])  # fmt: skip
    assert report.orphans.temporary == [f"images/{folders[-1].name}/.orphan.png.0123456789abcdef0123456789abcdef.tmp"]
    assert verify_output(str(output), clean=True).cleaned and verify_output(str(output)).orphans.count == 0
    assert len(list((output / "images").rglob("*.png"))) == len(IDS)


@pytest.mark.usefixtures("small_partitions")
def test_manifest_ids_streamed_per_row_group_across_files(tmp_path: Path) -> None:
    """A manifest without ids (derived from the file and row, as planned) in two files of several
    row groups; the output misses two of its rows and holds one id it does not have."""
    from pipeline.plan.manifest import derive_ids

    rows = [{"prompt": "p", "seed": 1}] * 7
    write_manifest(tmp_path / "m" / "a.parquet", rows, row_group_size=3)
    write_manifest(tmp_path / "m" / "sub" / "b.parquet", rows, row_group_size=2)
    ids = derive_ids("a.parquet", 0, 7).to_pylist() + derive_ids("sub/b.parquet", 0, 7).to_pylist()
    output = _parts(tmp_path / "out", [ids[:5], [*ids[6:12], ids[13], "stray"]])
    report = verify_output(str(output), manifest=str(tmp_path / "m"))
    assert report.manifest_rows == 14 and report.rejected_rows == 0
    assert report.problems == [
        "manifest id missing from the output (2): a-000000005, sub__b-000000005",
        "output id not in the manifest (1): stray",
    ]


def _rejects(output: Path, file: Path, rows: list[int]) -> None:
    from pipeline.plan.manifest import PROBLEM_SCHEMA

    (output / "rejects").mkdir(exist_ok=True)
    table = pa.table(
        {"file": [str(file)] * len(rows), "row": rows, "id": [None] * len(rows), "column": ["prompt"] * len(rows),
         "reason": ["prompt is empty"] * len(rows), "prompt": [""] * len(rows), "seed": ["1"] * len(rows)},
        schema=PROBLEM_SCHEMA,
    )  # fmt: skip
    pq.write_table(table, output / "rejects" / f"{file.stem}.parquet")


@pytest.mark.usefixtures("small_partitions")
def test_rejected_rows_are_not_missing(tmp_path: Path) -> None:
    """Rows rejects/ lists (by file and row) are skipped, not missing; a row listed twice counts
    once, and rows outside the file or of another file count for nothing."""
    rows = [{"id": i, "prompt": "p" if n % 3 else "", "seed": 1} for n, i in enumerate(IDS[:9])]
    a = write_manifest(tmp_path / "m" / "a.parquet", rows, row_group_size=4)
    b = write_manifest(tmp_path / "m" / "b.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in IDS[9:12]])
    output = _parts(tmp_path / "out", [[i for n, i in enumerate(IDS[:9]) if n % 3], IDS[9:11]])
    _rejects(output, a, [0, 3, 6, 6, 9, -1])
    _rejects(output, tmp_path / "m" / "elsewhere.parquet", [2])
    report = verify_output(str(output), manifest=str(tmp_path / "m"))
    assert (report.manifest_rows, report.rejected_rows) == (12, 3)
    assert report.problems == [f"manifest id missing from the output (1): {IDS[11]}"], report.summary()
    assert "rejected rows:    3" in report.summary()
    _rejects(output, b, [2])
    assert verify_output(str(output), manifest=str(tmp_path / "m")).ok


def test_tar_members_are_read_as_a_stream(tmp_path: Path) -> None:
    """In one tar a member is gone and another changed; the other tar is cut short."""
    output = _parts(tmp_path / "out", [IDS[:3], IDS[3:6]], layout="webdataset")
    tars = sorted((output / "shards").iterdir())

    def names(path: Path) -> list[str]:
        with tarfile.open(path) as tar:
            return tar.getnames()

    first = next(t for t in tars if "id-00.png" in names(t))
    second = next(t for t in tars if t != first)
    with tarfile.open(first) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]  # type: ignore[union-attr]
    with tarfile.open(first, "w") as tar:
        for info, data in members:
            if info.name == "id-00.png":
                continue
            if info.name == "id-01.png":
                data += b"!"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    second.write_bytes(second.read_bytes()[:700])
    report = verify_output(str(output))
    assert report.problems == [
        f"unreadable tar shard (1): shards/{second.name}",
        "image missing (1): id-00",
        "image sha256 or size mismatch (4): id-01, id-03, id-04, id-05",
    ]
    assert report.checked_images == 6


def test_manifest_and_output_on_different_filesystems(tmp_path: Path) -> None:
    """The manifest is read through its own filesystem (here local disk), the output through its
    own (fsspec's in-memory one, which behaves as an object store)."""
    import fsspec

    output = f"memory://verify-{tmp_path.name}"
    try:
        PartWriter(output=output, layout="files", image_format="png", model=ModelInfo("tiny", "Euler")).write(
            _encoded_batch(IDS[:4])
        )
        manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in IDS[:5]])
        report = verify_output(output, manifest=str(manifest))
        assert report.problems == [f"manifest id missing from the output (1): {IDS[4]}"]
        assert report.checked_images == 4 and report.manifest_rows == 5
    finally:
        fsspec.filesystem("memory").rm(output.removeprefix("memory:/"), recursive=True)


def test_a_sample_hashes_some_images_and_sizes_all(tmp_path: Path) -> None:
    """`sample`: every image's presence and size are checked, the sha256 of a random fraction."""
    output = _output(tmp_path)
    images = sorted((output / "images").rglob("*.png"))
    images[0].write_bytes(b"a different size")
    images[1].unlink()
    report = verify_output(str(output), sample=0.001)
    text = report.summary()
    assert "image sha256 or size mismatch (1)" in text and "image missing (1)" in text
    assert report.checked_images == 3 and report.hashed_images < 3
    assert "images checked:   3 (size; sha256 of" in text and "a random 0.10% sample, seed" in text
    with pytest.raises(ValueError, match="sample must be a fraction"):
        verify_output(str(output), sample=0.0)


def test_an_unfinished_output_says_that_a_rerun_resumes(tmp_path: Path) -> None:
    output = _output(tmp_path)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p", "seed": 1} for i in "abcd"])
    text = verify_output(str(output), manifest=str(manifest)).summary()
    assert "manifest id missing from the output (1): d" in text
    assert "rerun the job and it renders those rows only" in text
    assert "rerun the job" not in verify_output(str(output)).summary()  # a complete output: no such line

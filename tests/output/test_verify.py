from __future__ import annotations

from pathlib import Path

import pyarrow as pa

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

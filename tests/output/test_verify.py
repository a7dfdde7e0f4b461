from __future__ import annotations

from pathlib import Path

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
    assert (report.rows, report.parts, report.checked_images, report.orphan_images) == (3, 2, 3, 0)


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
    assert report.orphan_images == 1


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

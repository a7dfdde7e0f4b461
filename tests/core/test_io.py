from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.core.config import StorageConfig
from pipeline.core.io import (
    filesystem,
    full_uri,
    is_temporary_name,
    join,
    open_atomic,
    storage_options,
    temporary_path,
    write_bytes,
    write_files,
)


def test_storage_options_pass_only_what_is_set() -> None:
    assert storage_options("/local/path", StorageConfig(endpoint_url="http://x")) == {}
    options = storage_options("s3://bucket/key", StorageConfig())
    assert set(options) == {"config_kwargs"}  # AWS's own variables and profile still apply
    options = storage_options(
        "s3://bucket/key",
        StorageConfig(
            endpoint_url="http://127.0.0.1:9000", region="eu-west-1", key=SecretStr("k"), secret=SecretStr("s")
        ),
    )
    assert options["endpoint_url"] == "http://127.0.0.1:9000"
    assert options["key"] == "k" and options["secret"] == "s"
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert options["config_kwargs"]["retries"]["mode"] == "adaptive"


def test_local_writes_are_atomic_and_create_folders(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path))
    target = join(root, "a", "b", "file.bin")
    write_bytes(fs, target, b"payload")
    assert (tmp_path / "a" / "b" / "file.bin").read_bytes() == b"payload"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["file.bin"]
    assert full_uri(fs, root) == root


def test_file_uris_are_local(tmp_path: Path) -> None:
    fs, path = filesystem(f"file://{tmp_path}")
    assert path == str(tmp_path)
    assert full_uri(fs, path) == str(tmp_path)


def test_a_killed_local_write_leaves_a_temporary_that_no_glob_of_final_names_matches(tmp_path: Path) -> None:
    """duckdb and polars read every file a `metadata/*.parquet` glob matches, hidden ones too: a
    temporary that kept the final extension failed them on its truncated bytes."""
    fs, root = filesystem(str(tmp_path))
    target = join(root, "metadata", "part-0123.parquet")
    stale = Path(temporary_path(target))
    stale.parent.mkdir()
    stale.write_bytes(b"PAR1 truncated by a kill")  # the write that never reached its rename
    write_bytes(fs, target, b"committed")
    assert stale.parent == Path(target).parent and stale.name.startswith(".") and stale.name.endswith(".tmp")
    assert [Path(p).name for p in fs.glob(join(root, "metadata", "*.parquet"))] == ["part-0123.parquet"]
    assert list((tmp_path / "metadata").glob("*.parquet")) == [Path(target)]
    assert is_temporary_name(stale.name) and not is_temporary_name("part-0123.parquet")


def test_temporary_names_of_this_and_earlier_versions_are_recognised() -> None:
    hex32 = "0123456789abcdef" * 2
    assert is_temporary_name(f".part-1.parquet.{hex32}.tmp")
    assert is_temporary_name(f".tmp-{hex32}-part-1.parquet")  # earlier versions
    for name in ("part-1.parquet", ".hidden", "notes.tmp", f".x.{hex32[:8]}.tmp", f"tmp-{hex32}-a.tar", ".tmp"):
        assert not is_temporary_name(name), name


def test_a_failed_local_write_removes_its_temporary(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path))
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file where a folder is
    with pytest.raises(OSError):
        write_bytes(fs, join(root, "taken"), b"payload")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_streamed_write_appears_only_when_complete(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path))
    target = f"{root}/index.parquet"
    with open_atomic(fs, target) as handle:
        handle.write(b"half")
        assert not Path(target).exists()  # readers never see a partial index
        handle.write(b" and half")
    assert Path(target).read_bytes() == b"half and half"
    with pytest.raises(RuntimeError), open_atomic(fs, target) as handle:
        handle.write(b"broken")
        raise RuntimeError("the writer failed")
    assert Path(target).read_bytes() == b"half and half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.parquet"]  # no temporary left


@pytest.mark.integration
def test_a_failed_streamed_write_to_s3_leaves_no_object(s3_bucket: str, s3_env: dict[str, str]) -> None:
    """fsspec's own `with` would complete the upload of a partial object; ours aborts it."""
    fs, _ = filesystem(f"s3://{s3_bucket}/x")
    target = f"{s3_bucket}/index.parquet"
    with pytest.raises(RuntimeError), open_atomic(fs, target) as handle:
        handle.write(b"x" * (6 << 20))  # past s3fs's 5 MiB block: a multipart upload is under way
        raise RuntimeError("the writer failed")
    fs.invalidate_cache()
    assert not fs.exists(target)
    with open_atomic(fs, target) as handle:
        handle.write(b"y" * (6 << 20))
    fs.invalidate_cache()
    assert fs.size(target) == 6 << 20


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What `os.fsync` was called on: 'file' or 'folder'."""
    import os
    import stat

    real = os.fsync
    synced: list[str] = []

    def fsync(descriptor: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_local_writes_are_durable_file_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _count_fsyncs(monkeypatch)
    fs, root = filesystem(str(tmp_path / "out"))
    write_bytes(fs, f"{root}/metadata/part-a.parquet", b"part")
    assert synced == ["file", "folder"]  # the data, then the rename into its folder


def test_many_images_are_written_atomically_and_each_folder_synced_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _count_fsyncs(monkeypatch)
    fs, root = filesystem(str(tmp_path / "out"))
    targets = {f"{root}/images/aa/1.png": b"1", f"{root}/images/aa/2.png": b"2", f"{root}/images/bb/3.png": b"3"}
    write_files(fs, targets)
    assert sorted(synced) == ["file"] * 3 + ["folder"] * 2
    assert {path: Path(path).read_bytes() for path in targets} == targets
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_a_rerendered_image_killed_mid_write_leaves_the_old_image_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images used to be written in place: a kill mid-write left a truncated image that a
    committed part listed. Now the old image stays until the new one is whole."""
    import builtins

    fs, root = filesystem(str(tmp_path / "out"))
    image = f"{root}/images/aa/1.png"
    write_files(fs, {image: b"the whole old image"})
    real_open = builtins.open

    class Killed(BaseException):
        pass

    def open_then_die(path: str, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]
        if "w" in mode:
            handle.write(b"the new ")
            raise Killed
        return handle

    monkeypatch.setattr(builtins, "open", open_then_die)
    with pytest.raises(Killed):
        write_files(fs, {image: b"the new image, never finished"})
    monkeypatch.undo()
    assert Path(image).read_bytes() == b"the whole old image"

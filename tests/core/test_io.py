from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from pipeline.core.config import StorageConfig
from pipeline.core.io import filesystem, full_uri, join, storage_options, write_bytes


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

"""Weight sources: local folders, object-store mirrors (copied once per node), bad paths."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import s3fs

from pipeline.core.config import StorageConfig
from pipeline.core.errors import ModelError
from pipeline.models.weights import materialize, resolve_pipeline_source, resolve_weights_file


def test_local_folder_and_hub_id_pass_through(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_pipeline_source(str(tiny_dir), storage=None, cache_dir=tmp_path) == str(tiny_dir)
    assert resolve_pipeline_source("org/name", storage=None, cache_dir=tmp_path) == "org/name"


@pytest.mark.parametrize("path", ["/no/such/folder", "not a model", "a/b/c"])
def test_unresolvable_paths(path: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        resolve_pipeline_source(path, storage=None, cache_dir=tmp_path)


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"model_index\.json"):
        resolve_pipeline_source(str(tmp_path / "empty"), storage=None, cache_dir=tmp_path)


def test_materialize_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(folder: Path) -> None:
        calls.append(1)
        folder.mkdir()
        (folder / "weights").write_text("w")

    threads = [threading.Thread(target=materialize, args=(tmp_path, "k", build)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (tmp_path / "k" / "weights").read_text() == "w"


def test_interrupted_build_is_not_taken_as_complete(tmp_path: Path) -> None:
    def failing(folder: Path) -> None:
        folder.mkdir()
        raise RuntimeError("network went away")

    with pytest.raises(RuntimeError):
        materialize(tmp_path, "k", failing)
    assert not (tmp_path / "k").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")]


def test_object_store_sources_are_cached(
    tiny_dir: Path, tmp_path: Path, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.put(str(tiny_dir) + "/", f"{s3_bucket}/tiny/", recursive=True)
    fs.pipe(f"{s3_bucket}/loras/style.safetensors", b"not-really-weights")
    storage = StorageConfig()
    local = resolve_pipeline_source(f"s3://{s3_bucket}/tiny", storage=storage, cache_dir=tmp_path)
    assert (Path(local) / "model_index.json").exists() and (Path(local) / "unet").is_dir()
    fs.rm(f"{s3_bucket}/tiny", recursive=True)  # a second resolve must not go back to the store
    assert resolve_pipeline_source(f"s3://{s3_bucket}/tiny", storage=storage, cache_dir=tmp_path) == local
    file = resolve_weights_file(f"s3://{s3_bucket}/loras/style.safetensors", storage=storage, cache_dir=tmp_path)
    assert Path(file).read_bytes() == b"not-really-weights"
    with pytest.raises(ModelError, match="not found"):
        resolve_pipeline_source(f"s3://{s3_bucket}/missing", storage=storage, cache_dir=tmp_path)

"""Errors that keep their cause: each site that turns a storage, model or cluster error into a
message a user can act on keeps the underlying error as `__cause__`; `-v` prints the whole chain,
without `-v` only the message; a bug (a schema or cast error) is never passed off as a storage error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.core.errors import ClusterError, ModelError, StorageError
from pipeline.core.io import filesystem
from pipeline.core.layout import metadata_schema, write_json
from pipeline.output import writer as writer_module
from pipeline.output.writer import ModelInfo, PartWriter
from tests.helpers import write_config


def _batch(rows: int = 2, **override: Any) -> pa.Table:
    data = {
        "id": [f"r{i}" for i in range(rows)],
        "prompt": ["a cube"] * rows,
        "seed": list(range(rows)),
        "image": [b"\x89PNG fake"] * rows,
        **override,
    }
    return pa.table(data)


def _writer(tmp_path: Path, schema: pa.Schema | None = None) -> PartWriter:
    return PartWriter(
        output=str(tmp_path / "out"), layout="files", image_format="png", model=ModelInfo("m", "s"), schema=schema
    )


def test_a_write_that_fails_keeps_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(fs: Any, path: str, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(writer_module, "write_bytes", denied)
    with pytest.raises(StorageError, match=r"cannot write to the output .*rerun the same command") as caught:
        _writer(tmp_path).write(_batch())
    assert isinstance(caught.value.__cause__, PermissionError)


def test_a_schema_bug_in_the_writer_surfaces_as_itself(tmp_path: Path) -> None:
    """ArrowInvalid is a ValueError: it used to be reported as "cannot write to the output"."""
    schema = metadata_schema(pa.schema([pa.field("extra", pa.int64())]))
    with pytest.raises(pa.ArrowInvalid):
        _writer(tmp_path, schema).write(_batch(extra=["not a number", "nor this"]))


def test_a_json_record_that_cannot_be_written_keeps_its_cause(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    fs, root = filesystem(str(tmp_path / "file"))
    with pytest.raises(StorageError, match="cannot write to the output") as caught:
        write_json(fs, f"{root}/job.json", {"a": 1})  # its folder is a file
    assert isinstance(caught.value.__cause__, OSError)


def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing the manifest raises what botocore raises without credentials (not an OSError)."""
    from botocore.exceptions import NoCredentialsError

    from pipeline.plan import manifest

    def listing(*args: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr(manifest, "_root_and_files", listing)


def test_a_manifest_that_cannot_be_listed_keeps_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import NoCredentialsError

    from pipeline.plan.manifest import list_manifest_files

    _no_credentials(monkeypatch)
    with pytest.raises(StorageError, match="cannot list the manifest s3://bucket/m/: NoCredentialsError") as caught:
        list_manifest_files("s3://bucket/m/")
    assert isinstance(caught.value.__cause__, NoCredentialsError)


def test_weights_that_cannot_be_copied_keep_their_cause(s3_bucket: str, tmp_path: Path) -> None:
    from pipeline.models.weights import _copy_remote

    with pytest.raises(ModelError, match="not found in object storage") as caught:
        _copy_remote(f"s3://{s3_bucket}/no/model.safetensors", None, tmp_path / "copy", single_file=True)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_a_cluster_that_cannot_be_reached_keeps_its_cause() -> None:
    from pipeline.commands.submit import client

    with pytest.raises(ClusterError, match="cannot reach the Ray dashboard") as caught:
        client("http://127.0.0.1:9")
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_the_cli_prints_the_cause_only_with_verbose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "job.yaml", manifest="s3://bucket/m/", output=str(tmp_path / "out"))
    _no_credentials(monkeypatch)

    assert main(["validate", str(config)]) == 2
    quiet = capsys.readouterr().err
    assert quiet.startswith("error: cannot list the manifest s3://bucket/m/") and "Traceback" not in quiet

    assert main(["-v", "validate", str(config)]) == 2
    verbose = capsys.readouterr().err
    assert "Traceback (most recent call last)" in verbose
    assert "The above exception was the direct cause of the following exception" in verbose
    assert verbose.rstrip().splitlines()[-1] == quiet.rstrip()  # the message is still the last line

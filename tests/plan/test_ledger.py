from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import JobConfig
from pipeline.core.errors import ConfigError
from pipeline.core.io import filesystem
from pipeline.core.layout import committed_parts
from pipeline.plan.ledger import (
    check_fingerprint,
    clear_output,
    read_committed_schema,
    settings_fingerprint,
)


def _committed(config: JobConfig) -> tuple[list[str], object]:
    """The committed parts the planner would read, and their schema."""
    fs, root = filesystem(config.output, config.storage)
    parts = committed_parts(fs, root)
    return parts, read_committed_schema(fs, parts)


def _config(tmp_path: Path, **generation: object) -> JobConfig:
    return JobConfig.model_validate(
        {"manifest": "m.parquet", "output": str(tmp_path / "out"), "generation": generation}
    )


def test_fingerprint_is_stable_and_names_changes(tmp_path: Path) -> None:
    a, b = settings_fingerprint(_config(tmp_path)), settings_fingerprint(_config(tmp_path))
    assert a == b
    check_fingerprint(a, b, "out")
    check_fingerprint(None, b, "out")  # a new output
    # batch size does not change images, so it may change between runs
    check_fingerprint(a, settings_fingerprint(_config(tmp_path, batch_size=16)), "out")
    with pytest.raises(ConfigError, match=r"steps: 4 -> 8"):
        check_fingerprint(a, settings_fingerprint(_config(tmp_path, steps=8)), "out")


def test_clear_output_removes_only_what_a_job_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for entry in ("metadata/part-1.parquet", "images/ab/x.png", "shards/p.tar", "stats.json", "job.json"):
        (out / entry).parent.mkdir(parents=True, exist_ok=True)
        (out / entry).write_text("x")
    (out / "notes.txt").write_text("the user's own file")
    clear_output(_config(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_no_metadata_means_nothing_done(tmp_path: Path) -> None:
    assert _committed(_config(tmp_path)) == ([], None)


@pytest.mark.parametrize("leftover", [None, ".part-1.parquet.0123456789abcdef0123456789abcdef.tmp"])
def test_a_metadata_folder_without_a_committed_part_means_nothing_done(tmp_path: Path, leftover: str | None) -> None:
    """An empty `metadata/`, or one holding only the temporary file of a job killed during its
    first commit: nothing is done yet (it used to stop validate and run with an ArrowInvalid)."""
    folder = tmp_path / "out" / "metadata"
    folder.mkdir(parents=True)
    if leftover:
        (folder / leftover).write_bytes(b"PAR1 half a part")
    assert _committed(_config(tmp_path)) == ([], None)


@pytest.mark.integration
def test_an_empty_metadata_folder_on_s3_means_nothing_done(s3_bucket: str, s3_env: dict[str, str]) -> None:
    """The zero-byte `metadata/` marker that S3 consoles and some tools create for a folder."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"]).pipe(f"{s3_bucket}/out/metadata/", b"")
    config = JobConfig.model_validate({"manifest": "m.parquet", "output": f"s3://{s3_bucket}/out"})
    assert _committed(config) == ([], None)

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import JobConfig
from pipeline.core.errors import ConfigError
from pipeline.plan.ledger import check_fingerprint, clear_output, read_done_ids, settings_fingerprint


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
    assert len(read_done_ids(_config(tmp_path))) == 0

"""`images_per_prompt` and `manifest_format` through the real CLI: a `.txt` file that holds CSV,
two images per prompt, then four on the same output (only the new ones render)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers import read_metadata, run_cli, write_config

pytestmark = pytest.mark.integration


def test_images_per_prompt_renders_and_resumes_with_set(tmp_path: Path, model_cache: Path) -> None:
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("id,prompt,seed\nfox,a fox in the snow,7\nowl,an owl at night,8\n")
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        manifest_format="csv",
        model={"preset": "tiny", "cache_dir": str(model_cache), "device": "cpu"},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"rows_per_part": 4},
        resources={"actors": 1, "gpus_per_actor": 0},
    )
    checked = run_cli("validate", str(config), "--set", "images_per_prompt=2")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"manifest   {manifest} (manifest_format: csv): 1 file, 2 rows, 2 images each: 4 images" in checked.stdout
    assert "to render  4 images" in checked.stdout

    first = run_cli("run", str(config), "--no-progress", "--set", "images_per_prompt=2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Rendered 4 images" in first.stdout
    rows = {row["id"]: row for row in read_metadata(str(output)).to_pylist()}
    assert {i: (r["prompt"], r["seed"]) for i, r in rows.items()} == {
        "fox": ("a fox in the snow", 7), "fox-1": ("a fox in the snow", 8),
        "owl": ("an owl at night", 8), "owl-1": ("an owl at night", 9),
    }  # fmt: skip
    digests = {i: r["sha256"] for i, r in rows.items()}
    assert len(set(digests.values())) == 4  # each image its own seed
    for row in rows.values():
        assert hashlib.sha256((output / row["image_path"]).read_bytes()).hexdigest() == row["sha256"]

    more = run_cli("run", str(config), "--no-progress", "--set", "images_per_prompt=4")
    assert more.returncode == 0, more.stdout + more.stderr
    assert "Rendered 4 images" in more.stdout and "Resumed: 4 of 8 rows were already done" in more.stdout
    rows = {row["id"]: row for row in read_metadata(str(output)).to_pylist()}
    assert sorted(rows) == sorted(f"{i}{k}" for i in ("fox", "owl") for k in ("", "-1", "-2", "-3"))
    assert {i: rows[i]["seed"] for i in ("fox-2", "fox-3", "owl-2", "owl-3")} == {
        "fox-2": 9, "fox-3": 10, "owl-2": 10, "owl-3": 11,
    }  # fmt: skip
    assert {i: rows[i]["sha256"] for i in digests} == digests  # the first run's images are kept as they were

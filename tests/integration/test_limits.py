"""Limits end to end: prompts over CLIP's 77 tokens, and out-of-memory errors inside a Ray actor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import prompt_rows, read_metadata, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration
INJECT = Path(__file__).with_name("inject")


def test_long_prompts_and_out_of_memory_in_an_actor(tmp_path: Path, model_cache: Path) -> None:
    rows = prompt_rows(10)
    for i in (2, 7):
        rows[i]["prompt"] = " ".join([f"a very detailed painting of a red dog number {i}"] * 12)  # > 77 tokens
    for row in rows:
        row["negative_prompt"] = None
    rows[4]["negative_prompt"] = " ".join(["blurry, low quality"] * 40)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64, "guidance_scale": 1.5},
        write={"rows_per_part": 5},
    )
    # The actor's process sees a GPU that holds at most 2 images per call.
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "SDXL_BATCH_TEST_OOM_ABOVE": "2",
    }
    result = run_cli("run", str(config), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr

    stats = json.loads((output / "stats.json").read_text())
    assert stats["rows"] == 10
    assert stats["oom_retries"] >= 1 and 1 <= stats["min_render_batch_size"] <= 2
    assert stats["prompts_truncated"] == 2 and stats["negative_prompts_truncated"] == 1
    phases = {k: v for k, v in stats["stage_seconds"].items() if k.startswith("generate.")}
    assert set(phases) == {"generate.text_encode", "generate.denoise", "generate.vae_decode", "generate.to_host"}
    assert sum(phases.values()) <= stats["stage_seconds"]["generate"] * 1.01  # phases of the timed calls
    latency = stats["batch_latency_seconds"]
    assert stats["model_calls"] >= 3 and 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    # One stats record per committed part, next to its metadata.
    parts = {p.stem for p in (output / "metadata").iterdir()}
    assert parts == {p.stem for p in (output / "stats").glob("part-*.json")} and len(parts) == stats["parts"]
    # Warned once each, with the counts, not once per row or batch.
    assert result.stderr.count("longer than the text encoders' 77-token limit") == 1
    assert "2 prompt(s) and 1 negative prompt(s)" in result.stderr
    assert result.stderr.count("time(s): batches were split and retried") == 1

    table = read_metadata(str(output)).sort_by("id")
    truncated = dict(zip(table.column("id").to_pylist(), table.column("prompt_truncated").to_pylist(), strict=True))
    assert {i for i, flag in truncated.items() if flag} == {"row-0002", "row-0007"}
    tokens = table.column("prompt_tokens").to_pylist()
    assert all(t > 77 for t, flag in zip(tokens, truncated.values(), strict=True) if flag)
    assert table.column("negative_prompt_truncated").to_pylist().count(True) == 1
    assert set(table.column("render_batch_size").to_pylist()) <= {1, 2}
    assert "oom_retries" not in table.column_names  # a job-level count, not per row
    assert run_cli("verify", str(output), "--manifest", str(manifest)).returncode == 0

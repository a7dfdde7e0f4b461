"""`sdxl-batch run` end to end on local disk: a real embedded Ray, the tiny model, real files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import prompt_rows, read_metadata, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, model_cache: Path, manifest: Path, output: Path, **generation: object) -> Path:
    """A CPU job, on a machine with GPUs too: no GPU per actor, the model on the CPU (so no per-GPU
    figures and float32, to which the images' tolerances are set)."""
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache), "device": "cpu"},
        generation={"batch_size": 4, **generation},
        write={"rows_per_part": 5},
        resources={"actors": 1, "gpus_per_actor": 0},
    )


def test_run_renders_every_row_once(tmp_path: Path, model_cache: Path) -> None:
    rows = prompt_rows(10)
    rows[3]["width"], rows[3]["height"] = 64, 96  # a per-row size, batched on its own
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    # On Ray (a job this small would run in this process): its console and Ray's figures.
    result = run_cli(
        "run", str(_config(tmp_path, model_cache, manifest, output)), "--set", "resources.in_process=false"
    )
    assert result.returncode == 0, result.stderr
    # A quiet console: the progress line (on a pipe, a plain line per phase and at the end) on
    # standard error, the summary on standard output, and nothing else from Ray, torch or the hub.
    progress = re.compile(
        r"(checking the job|planning the manifest|starting Ray) \| 00:\d\d elapsed"
        r"|(starting the generators|loading the model: \d/1 actors ready) \| 0/10 rows \| \d\d:\d\d elapsed"
        r"|rendering: \d+/10 committed, \d+ rendered \| (\?|[\d.]+) img/s \(last min\) \| [\d:]+ elapsed, ETA [\d:?]+"
    )
    assert all(progress.fullmatch(text) for text in result.stderr.splitlines()), result.stderr
    assert result.stderr.splitlines()[-1].startswith("rendering: 10/10 committed, 10 rendered")
    summary = result.stdout.splitlines()
    assert re.fullmatch(r"Rendered 10 images in [\d.]+ s: [\d.]+ images/s wall", summary[0]), summary
    assert re.fullmatch(
        r"  start-up [\d.]+ s \(checks and planning [\d.]+ s, starting Ray [\d.]+ s, starting the generators "
        r"\(model load, first call\) [\d.]+ s\), rendering [\d.]+ s, finishing [\d.]+ s",
        summary[1],
    ), summary
    assert re.fullmatch(r"  [\d.]+ images/s rendering, [\d.]+ generating, [\d.]+ steady", summary[2]), summary
    assert [text.split()[0] for text in summary[3:]] == ["images", "metadata", "stats"], summary
    assert str(output / "stats.json") in result.stdout

    table = read_metadata(str(output))
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    for row in table.to_pylist():
        data = (output / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        image = Image.open(output / row["image_path"])
        assert image.size == (row["width"], row["height"])
        assert row["note"] == "n" + str(int(row["id"].split("-")[1]))  # pass-through column
        assert row["model"] == "tiny" and row["steps"] == 4 and row["guidance_scale"] == 0.0
        assert row["generation_seconds"] > 0 and row["node"] and row["actor"]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["rows"] == 10 and stats["images_per_second"] > 0 and stats["wall_seconds"] > 0
    # Where the wall time went, adding up to it; the summary printed the same figures.
    phases = stats["wall_breakdown_seconds"]
    assert list(phases) == ["planning", "starting_ray", "starting_generators", "rendering", "finishing"]
    assert abs(sum(phases.values()) - stats["wall_seconds"]) < 0.01 and phases["starting_generators"] > 0
    assert stats["rendering_images_per_second"] == round(10 / phases["rendering"], 4)
    assert f"{stats['images_per_second']:.2f} images/s wall" in summary[0]
    assert f"{stats['rendering_images_per_second']:.2f} images/s rendering" in summary[2]
    assert {"generate", "encode", "upload", "generate.denoise", "generate.vae_decode"} <= set(stats["stage_seconds"])
    # One stats record per committed part, next to the outputs; stats.json merges them.
    parts = [json.loads(p.read_text()) for p in (output / "stats").glob("part-*.json")]
    assert len(parts) == stats["parts"] and sum(p["rows"] for p in parts) == 10
    (actor,) = stats["per_actor"].values()
    assert actor["rows"] == 10 and actor["images_per_second"] > 0 and 0 < actor["busy_fraction"] <= 1
    assert actor["model_calls"] == stats["model_calls"] == sum(len(p["calls"]) for p in parts)
    assert stats["batch_latency_seconds"]["p50"] <= stats["batch_latency_seconds"]["p99"]
    assert stats["rows_skipped"] == 0 and stats["per_gpu"] == {} and stats["gpu_utilization_percent"] is None
    job = json.loads((output / "job.json").read_text())
    assert job["manifest_rows"] == 10
    # The files layout as Hugging Face's imagefolder reads it: the images with their metadata
    # (the card and metadata.parquet), no class labels made up from the shard folders.
    from datasets import load_dataset

    dataset = load_dataset(str(output), split="train")
    assert "label" not in dataset.features and sorted(dataset["id"]) == [r["id"] for r in rows]
    for row in dataset:
        assert row["image"].size == (row["width"], row["height"])
        assert row["note"] == "n" + str(int(row["id"].split("-")[1]))


def test_batch_size_and_the_runner_do_not_change_images(tmp_path: Path, model_cache: Path) -> None:
    """Batch 1 on Ray and batch 4 in this process (`resources.in_process`, the default for a small
    job on one generator): the same images, the same metadata but for where and when."""
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(4))
    images, tables = {}, {}
    for batch_size, in_process in ((1, "false"), (4, "auto")):
        output = tmp_path / f"out-{batch_size}"
        config = _config(tmp_path, model_cache, manifest, output)
        result = run_cli(
            "run", str(config), "--no-progress", "--set", f"generation.batch_size={batch_size}",
            "--set", f"resources.in_process={in_process}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        tables[batch_size] = read_metadata(str(output)).sort_by("id")
        images[batch_size] = {
            row["id"]: np.asarray(Image.open(output / row["image_path"])).astype(np.int16)
            for row in tables[batch_size].to_pylist()
        }
    assert images[1].keys() == images[4].keys()
    for row_id in images[1]:
        assert np.abs(images[1][row_id] - images[4][row_id]).max() <= 2
    ray, here = tables[1], tables[4]
    assert ray.schema == here.schema
    varying = {"node", "actor", "generation_seconds", "encode_seconds", "peak_memory_mb", "render_batch_size",
               "sha256", "bytes", "image_path", "committed_at"}  # fmt: skip
    for name in set(ray.column_names) - varying:
        assert ray.column(name).to_pylist() == here.column(name).to_pylist(), name
    assert set(here.column("actor").to_pylist()) == {next(iter(here.column("actor").to_pylist()))}
    assert here.column("node").to_pylist()[0].startswith("local:") and ray.column("node").to_pylist()[0] != "local"
    stats = json.loads((tmp_path / "out-4" / "stats.json").read_text())
    assert stats["wall_breakdown_seconds"]["starting_ray"] == 0.0 and stats["rows"] == 4


def test_a_partly_matching_lora_is_counted_in_stats_when_allowed(
    tmp_path: Path, model_cache: Path, tiny_dir: Path
) -> None:
    from pipeline.models.tiny import save_tiny_lora

    # A LoRA made on a deeper variant of the tiny UNet: 60 of its layers have no module here.
    deeper = {"transformer_layers_per_block": [1, 3]}
    lora = save_tiny_lora(tiny_dir, tmp_path, "deeper.safetensors", seed=6, layout="kohya", unet_overrides=deeper)
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=str(write_manifest(tmp_path / "m.parquet", prompt_rows(2))),
        output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache), "loras": [{"path": str(lora)}]},
        generation={"batch_size": 2, "steps": 2, "width": 64, "height": 64},
        resources={"actors": 1},
    )
    refused = run_cli("run", str(config), "--no-progress")
    assert refused.returncode != 0 and "only partly fits this pipeline" in refused.stderr
    assert "allow_partial_lora" in refused.stderr and not (output / "metadata").exists()
    assert "Traceback" not in refused.stderr and "unexpected keys" not in refused.stderr  # one message, not 120 keys
    result = run_cli("run", str(config), "--no-progress", "--set", "model.allow_partial_lora=true")
    assert result.returncode == 0, result.stderr
    stats = json.loads((output / "stats.json").read_text())
    assert stats["rows"] == 2 and stats["lora_layers_unmatched"] == 60


def test_malformed_manifest_fails_before_rendering(tmp_path: Path, model_cache: Path) -> None:
    rows = prompt_rows(3)
    rows[2]["prompt"] = None
    manifest = write_manifest(tmp_path / "bad.parquet", rows)
    output = tmp_path / "out"
    result = run_cli("run", str(_config(tmp_path, model_cache, manifest, output)), "--no-progress")
    assert result.returncode == 1  # bad rows, as validate reports them
    assert "bad.parquet" in result.stderr and "row 2" in result.stderr and "'prompt'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (output / "metadata").exists() and not (output / "stats.json").exists()


def test_unknown_config_key_fails_clearly(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", manifest="m.parquet", output="o", resources={"actor": 2})
    result = run_cli("run", str(config))
    assert result.returncode == 2
    assert "resources.actor: unknown key" in result.stderr and "Traceback" not in result.stderr

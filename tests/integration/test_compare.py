"""`sdxl-batch compare` over a preset of each kind: each renders the manifest through the job runner, from
tiny artifacts under its real hub names (the suite runs with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.commands.compare import LABEL_HEIGHT, TILE, TITLE_HEIGHT
from pipeline.models.presets import PRESETS
from tests.helpers import read_metadata, run_cli, write_manifest

pytestmark = pytest.mark.integration


def test_compare_a_preset_of_each_kind(tmp_path: Path, tiny_hub: Path, model_cache: Path) -> None:
    rows = [
        {"id": f"{tag}-{seed}", "prompt": prompt, "seed": seed}
        for tag, prompt in (("fish", "a fish made out of flowers"), ("dungeon", "3d isometric dungeon game"))
        for seed in (1, 2)
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    # A full pipeline (stored scheduler), a UNet file (Euler), a LoRA (kohya layout) and a UNet folder
    # (LCM): each way of loading, through the job runner. tests/models/test_zoo.py loads and renders
    # every preset; `make demo` compares three of them, `make compare` six.
    presets = ["sdxl-base", "lightning-4step", "lightning-lora-4step", "lcm"]
    assert set(presets) <= set(PRESETS)
    output = tmp_path / "compare"
    result = run_cli(
        "compare", "--presets", ",".join(presets), "--manifest", str(manifest), "--output", str(output),
        "--set", "generation.width=64", "--set", "generation.height=64", "--set", "generation.batch_size=4",
        "--set", f"model.cache_dir={model_cache}", "--no-progress",
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    for name in presets:
        metadata = read_metadata(str(output / name))
        assert sorted(metadata.column("id").to_pylist()) == sorted(r["id"] for r in rows), name
        preset = PRESETS[name]
        assert set(metadata.column("model").to_pylist()) == {name}
        assert set(metadata.column("scheduler").to_pylist()) == {preset.scheduler_label()}
        assert set(metadata.column("steps").to_pylist()) == {preset.steps}
        assert set(metadata.column("guidance_scale").to_pylist()) == {preset.guidance_scale}
        assert all(preset.base.split("/")[-1] in w for w in metadata.column("weights").to_pylist())
    grids = sorted((output / "grids").iterdir())
    assert len(grids) == 2  # one per prompt
    with Image.open(grids[0]) as grid:
        assert grid.size == (TILE * len(presets), TITLE_HEIGHT + 2 * (TILE + LABEL_HEIGHT))  # a tile per preset x seed
    stats = json.loads((output / "stats.json").read_text())
    assert set(stats["presets"]) == set(presets)
    assert all(s["seconds_per_image"] > 0 and s["peak_memory_mb"] > 0 for s in stats["presets"].values())
    table = (output / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in presets)

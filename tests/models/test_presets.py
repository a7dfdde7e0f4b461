from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import GenerationConfig, ModelConfig
from pipeline.core.errors import ModelError
from pipeline.models.generator import ImageGenerator
from pipeline.models.presets import PRESETS, get_preset
from pipeline.plan.settings import SettingDefaults


def test_issue_presets_exist_with_their_settings() -> None:
    base, lightning = get_preset("sdxl-base"), get_preset("lightning-4step")
    assert (base.steps, base.guidance_scale, base.scheduler) == (30, 5.0, "stored")
    assert base.base == "stabilityai/stable-diffusion-xl-base-1.0" and base.unet is None
    assert (lightning.steps, lightning.guidance_scale) == (4, 0.0)
    assert lightning.scheduler == "EulerDiscreteScheduler"
    assert lightning.scheduler_config == {"timestep_spacing": "trailing"}
    assert lightning.unet == "hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors"
    assert {"tiny", "sdxl-base", "lightning-4step"} <= set(PRESETS)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match="lightning-4step"):
        get_preset("lightning-3step")


def test_sdxl_base_keeps_the_stored_scheduler(tiny_dir: Path, model_cache: Path) -> None:
    generator = ImageGenerator(ModelConfig(preset="sdxl-base", path=str(tiny_dir), cache_dir=str(model_cache)))
    generator.load()
    scheduler = generator.pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert scheduler.config.timestep_spacing == "leading"  # as stored in the folder, untouched
    defaults = SettingDefaults.from_config(GenerationConfig(), generator.preset)
    assert (defaults.steps, defaults.guidance_scale, defaults.width) == (30, 5.0, 1024)

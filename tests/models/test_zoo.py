"""Every preset, loaded from tiny artifacts under its real hub names (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.config import LoraConfig, ModelConfig
from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator
from pipeline.models.presets import FP16_FIX_VAE, PRESETS, check_job_settings, get_preset
from pipeline.models.tiny import save_tiny_lora

EXPECTED_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sdxl-base": ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    "lightning-1step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "sample"}),
    "lightning-2step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "epsilon"}),
    "lightning-4step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lightning-8step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lightning-lora-2step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lightning-lora-4step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lightning-lora-8step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}),
    "lcm-lora": ("LCMScheduler", {}),
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "hyper-sd-1step": ("TCDScheduler", {}),
    "hyper-sd-2step": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "hyper-sd-4step": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "hyper-sd-8step": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dmd2-4step": ("LCMScheduler", {}),
    "tcd-lora": ("TCDScheduler", {}),
}
SMALL = 64


def _load(model_cache: Path, **model: Any) -> ImageGenerator:
    generator = ImageGenerator(ModelConfig(cache_dir=str(model_cache), **model))
    generator.load()
    return generator


def _render(generator: ImageGenerator, *, seed: int = 7, negative: str | None = None) -> np.ndarray:
    preset = generator.preset
    settings = RenderSettings(SMALL, SMALL, preset.steps, preset.guidance_scale, negative=negative is not None)
    image: np.ndarray = generator.generate(["a fish made out of flowers"], [negative], [seed], settings)[0]
    return image


def test_every_preset_is_covered() -> None:
    assert set(EXPECTED_SCHEDULERS) | {"tiny"} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEDULERS))
def test_preset_loads_and_renders(name: str, tiny_hub: Path, model_cache: Path) -> None:
    generator = _load(model_cache, preset=name)
    scheduler = generator.pipe.scheduler
    expected_class, expected_config = EXPECTED_SCHEDULERS[name]
    assert type(scheduler).__name__ == expected_class
    for key, value in expected_config.items():
        assert scheduler.config[key] == value, key
    image = _render(generator)
    assert image.shape == (SMALL, SMALL, 3) and image.std() > 0
    if name == "dmd2-4step":
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    if name in ("lightning-4step", "lightning-lora-4step"):
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_preset_defaults() -> None:
    assert (get_preset("turbo").width, get_preset("turbo").steps, get_preset("turbo").guidance_scale) == (512, 1, 0.0)
    assert get_preset("lcm-lora").guidance_scale == 1.0
    assert get_preset("lcm").guidance_scale == 8.0
    assert "non-commercial" in get_preset("dmd2-4step").licence
    assert get_preset("hyper-sd-1step").call_kwargs == {"eta": 1.0}


def test_lcm_guidance_goes_through_the_unet_embedding(tiny_hub: Path, model_cache: Path) -> None:
    generator = _load(model_cache, preset="lcm")
    assert generator.pipe.unet.config.time_cond_proj_dim is not None
    low = generator.generate(["a cat"], [None], [1], RenderSettings(SMALL, SMALL, 4, 2.0))
    high = generator.generate(["a cat"], [None], [1], RenderSettings(SMALL, SMALL, 4, 8.0))
    assert np.abs(low.astype(int) - high.astype(int)).max() > 0
    assert not generator.pipe.do_classifier_free_guidance  # the embedding, not a second CFG pass


def test_lora_changes_the_output_and_fusing_preserves_it(tiny_hub: Path, model_cache: Path) -> None:
    # On the CPU: fused and unfused agree within float32's tolerance, not necessarily a 16-bit GPU's.
    without = _render(_load(model_cache, preset="tiny", device="cpu"))  # the same base weights, scheduler and steps
    fused = _render(_load(model_cache, preset="lightning-lora-4step", device="cpu"))
    unfused_generator = _load(model_cache, preset="lightning-lora-4step", fuse_loras=False, device="cpu")
    unfused = _render(unfused_generator)
    assert np.abs(fused.astype(int) - without.astype(int)).max() > 10
    assert np.abs(fused.astype(int) - unfused.astype(int)).max() <= 2
    fused_unet = _load(model_cache, preset="lightning-lora-4step", device="cpu").pipe.unet
    assert not any(hasattr(m, "lora_A") for m in fused_unet.modules())  # adapters unloaded after fusing
    assert any(hasattr(m, "lora_A") for m in unfused_generator.pipe.unet.modules())


def test_style_loras_stack_with_weights(tiny_hub: Path, model_cache: Path, tmp_path: Path) -> None:
    base = tiny_hub / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots"
    style = save_tiny_lora(next(base.iterdir()), tmp_path, "toy_face.safetensors", seed=99)
    # On the CPU, as above: a LoRA of weight 0 leaves the images within float32's tolerance.
    plain = _render(_load(model_cache, preset="lcm-lora", device="cpu"))
    zero = _render(_load(model_cache, preset="lcm-lora", device="cpu", loras=[LoraConfig(path=str(style), weight=0.0)]))
    styled = _render(
        _load(model_cache, preset="lcm-lora", device="cpu", loras=[LoraConfig(path=str(style), weight=0.8)])
    )
    assert np.abs(zero.astype(int) - plain.astype(int)).max() <= 2
    assert np.abs(styled.astype(int) - plain.astype(int)).max() > 10


def test_lcm_lora_negative_prompt_takes_effect_above_guidance_one(tiny_hub: Path, model_cache: Path) -> None:
    generator = _load(model_cache, preset="lcm-lora")
    settings = RenderSettings(SMALL, SMALL, 4, 1.5, negative=True)
    a = generator.generate(["a cat"], ["blurry"], [1], settings)
    b = generator.generate(["a cat"], ["sharp"], [1], settings)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


@pytest.mark.parametrize(
    ("name", "steps", "guidance", "match"),
    [
        ("lightning-4step", 8, 0.0, "takes 4 steps, not 8"),
        ("lightning-4step", 4, 3.0, "guidance 0 to 1, not 3"),
        ("turbo", 5, 0.0, "1 to 4 steps"),
        ("turbo", 1, 2.0, "guidance"),
        ("lcm-lora", 4, 3.0, "negative prompt"),
        ("dmd2-4step", 2, 0.0, "four timesteps"),
    ],
)
def test_harmful_settings_are_rejected_with_the_reason(name: str, steps: int, guidance: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_job_settings(get_preset(name), steps=steps, guidance_scale=guidance)


def test_supported_settings_pass() -> None:
    check_job_settings(get_preset("lcm-lora"), steps=4, guidance_scale=1.5)
    check_job_settings(get_preset("turbo"), steps=4, guidance_scale=0.0)
    check_job_settings(get_preset("sdxl-base"), steps=30, guidance_scale=5.0)


def test_there_is_no_one_step_lightning_lora() -> None:
    with pytest.raises(ModelError, match="no 1-step LoRA"):
        get_preset("lightning-lora-1step")


def test_fp16_runs_use_the_fp16_fix_vae(model_cache: Path) -> None:
    generator = ImageGenerator(ModelConfig(preset="lightning-4step"))
    generator.dtype = torch.float16
    assert generator.vae_ref() == FP16_FIX_VAE
    generator.dtype = torch.bfloat16
    assert generator.vae_ref() is None
    generator = ImageGenerator(ModelConfig(preset="lightning-4step", vae="my/vae"))
    generator.dtype = torch.float16
    assert generator.vae_ref() == "my/vae"
    generator = ImageGenerator(ModelConfig(preset="lightning-4step", fp16_fix_vae=False))
    generator.dtype = torch.float16
    assert generator.vae_ref() is None


def test_vae_override_loads(tiny_hub: Path, model_cache: Path) -> None:
    generator = _load(model_cache, preset="lightning-4step", vae=FP16_FIX_VAE)
    assert type(generator.pipe.vae).__name__ == "AutoencoderKL"
    assert _render(generator).std() > 0

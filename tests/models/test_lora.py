"""LoRA files in every layout the published ones use, and the check that a file fits the pipeline.

The stand-ins are random LoRAs on the tiny pipeline, written by pipeline/models/tiny.py in peft's
layout (diffusers' `save_lora_weights`), kohya's (`lora_unet_*.lora_down/lora_up/.alpha`, float16,
with conv and time-embedding layers, as SDXL-Lightning, Hyper-SD and LCM-LoRA publish theirs) and
diffusers' pre-peft layout (`lora.down` / `lora_linear_layer`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.config import LoraConfig, ModelConfig
from pipeline.core.errors import ModelError
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator
from pipeline.models.lora import LoraFit, check_fit, file_layer_names
from pipeline.models.tiny import LoraLayout, save_tiny_lora, tiny_lora_layers

UNET_LAYERS = 177  # LORA_TARGETS in the tiny UNet: attention, feed-forward, conv and time_emb_proj layers
TEXT_LAYERS = 30  # q/k/v/out projections and fc1/fc2 of 5 CLIP layers, per text encoder
SETTINGS = RenderSettings(64, 64, 4, 0.0)
DEEPER = {"transformer_layers_per_block": [1, 3]}  # 6 attentions x 10 projections more than the tiny UNet


def _load(model_cache: Path, **model: Any) -> ImageGenerator:
    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), **model))
    generator.load()
    return generator


def _render(generator: ImageGenerator) -> np.ndarray:
    pixels: np.ndarray = generator.generate(["a fish made out of flowers"], [None], [7], SETTINGS)[0]
    return pixels.astype(np.int16)


def _weights(generator: ImageGenerator) -> dict[str, torch.Tensor]:
    pipe = generator.pipe
    return {
        f"{name}.{key}": value
        for name in ("unet", "text_encoder", "text_encoder_2")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["peft", "kohya", "legacy"])
def test_every_layout_is_read_layer_for_layer(layout: LoraLayout, tiny_dir: Path, tmp_path: Path) -> None:
    path = save_tiny_lora(tiny_dir, tmp_path, "lora.safetensors", seed=5, layout=layout, text_encoders=True)
    names = file_layer_names(str(path))
    assert len(names) == UNET_LAYERS + 2 * TEXT_LAYERS
    if layout == "kohya":
        state = load_file(str(path))
        assert {v.dtype for v in state.values()} == {torch.float16}
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert state[f"{conv}.lora_down.weight"].ndim == 4 and state[f"{conv}.alpha"].item() == 2.0
        assert "lora_unet_up_blocks_1_resnets_2_time_emb_proj" in names
        assert "lora_te2_text_model_encoder_layers_4_mlp_fc2" in names


@pytest.mark.parametrize("layout", ["kohya", "legacy"])
def test_a_lora_in_any_layout_fuses_and_renders_as_in_peft_layout(
    layout: LoraLayout, tiny_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    # kohya's file stores lora_up = B * rank / alpha with alpha 1 != rank 4: only a loader that
    # scales by alpha / rank gets back W + B @ A, the weights the peft file gives.
    peft = save_tiny_lora(tiny_dir, tmp_path, "peft.safetensors", seed=5, text_encoders=True)
    other = save_tiny_lora(tiny_dir, tmp_path, "other.safetensors", seed=5, layout=layout, alpha=1, text_encoders=True)
    base, reference, loaded = (_load(model_cache, **lora) for lora in ({}, {"lora": str(peft)}, {"lora": str(other)}))
    base_w, reference_w, loaded_w = _weights(base), _weights(reference), _weights(loaded)
    changed = [k for k in base_w if not torch.equal(base_w[k], reference_w[k])]
    assert any(k.startswith("text_encoder_2.") for k in changed) and any(".conv1." in k for k in changed)
    assert any("time_emb_proj" in k for k in changed)
    for key in changed:
        delta = (reference_w[key] - base_w[key]).abs().max()
        assert (loaded_w[key] - reference_w[key]).abs().max() <= 0.01 * delta + 1e-4, key  # float16 rounding
    assert loaded.lora_layers_unmatched == 0
    assert np.abs(_render(loaded) - _render(reference)).max() <= 2
    assert np.abs(_render(reference) - _render(base)).max() > 10


def test_kohya_alpha_scales_each_layer(tiny_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    state = load_file(str(save_tiny_lora(tiny_dir, tmp_path, "a1.safetensors", seed=5, layout="kohya", alpha=1)))
    doubled = _save(tmp_path / "a2.safetensors", {k: v * 2 if k.endswith(".alpha") else v for k, v in state.items()})
    base = _weights(_load(model_cache))
    one = _weights(_load(model_cache, lora=str(tmp_path / "a1.safetensors")))
    two = _weights(_load(model_cache, lora=str(doubled)))
    key = "unet.down_blocks.1.attentions.0.proj_in.weight"
    torch.testing.assert_close(two[key] - base[key], 2 * (one[key] - base[key]), rtol=1e-3, atol=1e-5)


def _lora_for_a_deeper_unet(tiny_dir: Path, folder: Path) -> Path:
    """A kohya-layout LoRA trained on a variant of the tiny UNet with a third transformer layer
    per block: its layers for the two shared ones fit, those for the third do not exist here."""
    return save_tiny_lora(tiny_dir, folder, "deeper.safetensors", seed=6, layout="kohya", unet_overrides=DEEPER)


def test_a_lora_that_only_partly_fits_is_an_error_naming_the_counts(
    tiny_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    path = _lora_for_a_deeper_unet(tiny_dir, tmp_path)
    with pytest.raises(ModelError) as error:
        _load(model_cache, loras=[LoraConfig(path=str(path))])
    message = str(error.value)
    # 6 attentions (down, mid, up) x 1 extra transformer block x 10 projections do not exist here.
    assert f"LoRA {path} only partly fits this pipeline: {UNET_LAYERS} of its {UNET_LAYERS + 60} layers" in message
    assert "60 do not" in message and "unet.down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_k" in message
    assert "model.allow_partial_lora: true" in message


def test_a_partial_lora_loads_when_allowed_with_a_warning_and_a_count(
    tiny_dir: Path, model_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _lora_for_a_deeper_unet(tiny_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.lora"):
        generator = _load(model_cache, loras=[LoraConfig(path=str(path))], allow_partial_lora=True)
    assert generator.lora_layers_unmatched == 60
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.models.lora"]
    assert f"{UNET_LAYERS} of its {UNET_LAYERS + 60} layers match" in warning and "lora_layers_unmatched" in warning
    assert np.abs(_render(generator) - _render(_load(model_cache))).max() > 10  # the matching layers apply


def test_layers_dropped_by_the_kohya_conversion_count_as_unmatched(
    tiny_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    # diffusers discards sgm-named keys (input_blocks_*) without a word when the file also has
    # diffusers-named ones; the count of the file's own layers still sees them.
    state = load_file(str(save_tiny_lora(tiny_dir, tmp_path, "k.safetensors", seed=5, layout="kohya")))
    sgm = "lora_unet_input_blocks_4_1_proj_in"
    state |= {f"{sgm}.lora_down.weight": torch.zeros(4, 64).half(), f"{sgm}.lora_up.weight": torch.zeros(64, 4).half()}
    with pytest.raises(ModelError, match=r"1 discarded by diffusers' conversion of the file's keys"):
        _load(model_cache, lora=str(_save(tmp_path / "mixed.safetensors", state)))


def test_extra_layers_in_peft_layout_are_caught_too(tiny_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    state = load_file(str(save_tiny_lora(tiny_dir, tmp_path, "p.safetensors", seed=5)))
    extra = "unet.up_blocks.3.attentions.0.proj_in"
    state |= {f"{extra}.lora_A.weight": torch.zeros(4, 64), f"{extra}.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ModelError, match=rf"{UNET_LAYERS} of its {UNET_LAYERS + 1} layers .*\(not loaded: {extra}\)"):
        _load(model_cache, lora=str(_save(tmp_path / "extra.safetensors", state)))


def test_a_lora_with_no_matching_layer_is_an_error_even_when_partial_is_allowed(
    tiny_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    # peft's own adapter files carry no `unet.` prefix: diffusers loads nothing from them, silently.
    layers = tiny_lora_layers(tiny_dir, seed=5)
    path = _save(tmp_path / "adapter_model.safetensors", layers["unet"])
    with pytest.raises(ModelError, match=rf"none of its {UNET_LAYERS} layers match it \(e.g. down_blocks"):
        _load(model_cache, lora=str(path), allow_partial_lora=True)
    # A file whose layers name modules the UNet does not have at all: peft refuses it.
    state = {"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64).half()}
    state["lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight"] = torch.zeros(64, 4).half()
    with pytest.raises(ModelError, match="does not fit this pipeline"):
        _load(model_cache, lora=str(_save(tmp_path / "other.safetensors", state)), allow_partial_lora=True)


def test_the_hub_stand_ins_use_the_published_layouts(tiny_hub: Path, tmp_path: Path) -> None:
    from pipeline.models.weights import load_state_dict_file, resolve_weights_file

    def state(ref: str) -> dict[str, torch.Tensor]:
        return load_state_dict_file(resolve_weights_file(ref, storage=None, cache_dir=tmp_path))

    for ref in (
        "hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors",
        "hf://ByteDance/Hyper-SD/Hyper-SDXL-1step-lora.safetensors",
        "hf://latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors",
    ):
        kohya = state(ref)
        assert all(k.startswith("lora_unet_") for k in kohya) and {v.dtype for v in kohya.values()} == {torch.float16}
        assert kohya["lora_unet_mid_block_resnets_0_conv2.lora_down.weight"].ndim == 4, ref
        assert "lora_unet_down_blocks_1_resnets_0_time_emb_proj.alpha" in kohya, ref
    tcd = state("hf://h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tcd)
    for ref in (
        "hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
        "hf://tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin",
    ):
        assert {v.dtype for v in state(ref).values()} == {torch.float16}, ref


def test_the_verdicts_and_their_wording() -> None:
    with pytest.raises(ModelError, match="holds no LoRA layers diffusers can read"):
        check_fit(LoraFit(ref="x.safetensors", layers=0, loaded=0), allow_partial=True)
    fit = LoraFit(ref="x", layers=12, loaded=4, unmatched_names=tuple(f"unet.m{i}" for i in range(7)), dropped=1)
    assert fit.summary() == (
        "4 of its 12 layers match the pipeline, 8 do not (not loaded: unet.m0, unet.m1, unet.m2, unet.m3, unet.m4 "
        "and 2 more; 1 discarded by diffusers' conversion of the file's keys)"
    )
    assert check_fit(fit, allow_partial=True) == 8
    assert check_fit(LoraFit(ref="x", layers=0, loaded=3), allow_partial=False) == 0  # a layout we cannot count


def test_loras_are_fused_on_the_device(
    tiny_dir: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline moves to its device before its LoRAs are loaded and fused: peft merges each
    layer where its weight is (on a GPU in well under a second; on the actor's one CPU thread
    10-30 s for an SDXL LoRA). Recorded here as the order of the calls, and the UNet's device at
    `fuse_lora` (the CPU here; CUDA in the `gpu` variant)."""
    from diffusers import StableDiffusionXLPipeline

    events: list[str] = []
    to, fuse = StableDiffusionXLPipeline.to, StableDiffusionXLPipeline.fuse_lora

    def recording_to(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("to")
        return to(self, *args, **kwargs)

    def recording_fuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(f"fuse_lora on {self.unet.device.type}")
        return fuse(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "to", recording_to)
    monkeypatch.setattr(StableDiffusionXLPipeline, "fuse_lora", recording_fuse)
    lora = save_tiny_lora(tiny_dir, tmp_path, "lora.safetensors", seed=5)
    generator = _load(model_cache, lora=str(lora))
    device = generator.device
    assert events[:2] == ["to", f"fuse_lora on {device}"]

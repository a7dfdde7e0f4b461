"""The presets' published LoRA files, at full SDXL size, against diffusers' loader and the fit check.

The weights cannot be downloaded here, so each file is rebuilt from what is public about it:

- Which layers: the LoRA target modules of diffusers' consistency-distillation scripts
  (`train_lcm_distill_lora_sdxl*.py`: attention q/k/v/out, proj_in/out, feed-forward, resnet
  conv1/conv2/conv_shortcut/time_emb_proj, down/upsampler convs), which LCM-LoRA was trained with
  and TCD's script inherits. The LCM-LoRA report (Luo et al., 2023, table 1) gives 197M LoRA
  parameters for SDXL and 67.5M for SD 1.5 at rank 64: these targets on the real architectures
  give 196.8M and 67.3M (checked below), so the layer set is theirs, 788 layers on SDXL. The
  Lightning and Hyper-SD LoRA files' sizes as the Hub lists them (394 MB and 787 MB in float16;
  recalled, not checked here: no Hub access) are the same set at ranks 64 and 128.
- Which layout: kohya's `lora_unet_*.lora_down/lora_up/.alpha` in float16, spelled with
  diffusers' module names (as the Lightning, Hyper-SD and LCM-LoRA files are) or with the sgm
  UNet's (`input_blocks_4_1_...`, as kohya-ss's own SDXL trainer writes them), and diffusers'
  peft (`unet.*.lora_A.weight`) and pre-peft (`unet.*.lora.down.weight`) layouts (TCD-LoRA was
  saved by diffusers' `save_lora_weights`). Every layout is tried, so a guess about one file's
  spelling cannot hide a layer diffusers would drop.

Each stand-in is rank 1 (its tensors are 6 MB) and is loaded by the project's own `load_loras`
into a full-size SDXL UNet built on the meta device (no memory), through diffusers' key conversion
and peft's injection exactly as on a GPU; the fit check then counts layers in the file against
layers that received the adapter. A real file differs only in the numbers inside its tensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.errors import ModelError
from pipeline.models.lora import file_layer_names, load_loras, loaded_layer_names
from pipeline.models.presets import PRESETS
from pipeline.models.tiny import LORA_TARGETS

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (as benchmarks/gpu_throughput.py builds it).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
# runwayml/stable-diffusion-v1-5, unet/config.json: diffusers' UNet2DConditionModel defaults but these.
SD15_UNET: dict[str, Any] = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_LAYERS = 788
LAYOUTS = ("kohya", "kohya-sgm", "peft", "diffusers-legacy")
# The published file of each LoRA preset and the layouts it is known or suspected to use.
PUBLISHED = {
    "ByteDance/SDXL-Lightning": ("kohya", "kohya-sgm"),
    "ByteDance/Hyper-SD": ("kohya", "kohya-sgm"),
    "latent-consistency/lcm-lora-sdxl": ("kohya", "kohya-sgm", "peft"),
    "h1t/TCD-SDXL-LoRA": ("peft", "diffusers-legacy"),
}
_RESNET_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _meta_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _targets(unet: Any) -> dict[str, Any]:
    """The UNet's modules a LoRA with LORA_TARGETS covers, by peft's own matching rule."""
    return {
        name: module for name, module in unet.named_modules()
        if any(name == target or name.endswith(f".{target}") for target in LORA_TARGETS)
    }  # fmt: skip


def _sgm_name(name: str, unet: Any) -> str:
    """A diffusers module path of the SDXL UNet as the sgm UNet (kohya-ss's SDXL trainer) spells it."""
    if match := re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name
    ):
        side, i, part, j, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if part == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op"
        if part == "upsamplers":
            return f"output_blocks.{3 * i + 2}.{2 if hasattr(unet.up_blocks[i], 'attentions') else 1}.conv"
        block = f"input_blocks.{3 * i + j + 1}" if side == "down" else f"output_blocks.{3 * i + j}"
        return f"{block}.0.{_RESNET_SGM[rest]}" if part == "resnets" else f"{block}.1.{rest}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    assert match, name
    part, j, rest = match[1], int(match[2]), match[3]
    return f"middle_block.{2 * j}.{_RESNET_SGM[rest]}" if part == "resnets" else f"middle_block.1.{rest}"


def _lora_file(path: Path, unet: Any, layout: str) -> Path:
    """A rank-1 LoRA over every target module of `unet`, in `layout`, float16 as published."""
    state: dict[str, torch.Tensor] = {}
    for name, module in _targets(unet).items():
        weight = module.weight
        down = torch.zeros((1, *weight.shape[1:]), dtype=torch.float16)
        up = torch.zeros((weight.shape[0], 1, 1, 1) if weight.ndim == 4 else (weight.shape[0], 1), dtype=torch.float16)
        if layout.startswith("kohya"):
            key = "lora_unet_" + (_sgm_name(name, unet) if layout == "kohya-sgm" else name).replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            state[f"{key}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
        elif layout == "peft":
            state.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
        else:
            state.update({f"unet.{name}.lora.down.weight": down, f"unet.{name}.lora.up.weight": up})
    save_file(state, str(path))
    return path


def _pipeline(unet: Any) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    none: Any = None
    return StableDiffusionXLPipeline(
        vae=none, text_encoder=none, text_encoder_2=none, tokenizer=none, tokenizer_2=none,
        unet=unet, scheduler=EulerDiscreteScheduler(),
    )  # fmt: skip


def _parameters(unet: Any, rank: int) -> int:
    return sum(rank * module.weight[0].numel() + module.weight.shape[0] * rank for module in _targets(unet).values())


def test_the_target_layers_are_those_of_the_published_lora_sizes() -> None:
    sdxl, sd15 = _meta_unet(SDXL_UNET), _meta_unet(SD15_UNET)
    assert len(_targets(sdxl)) == SDXL_LAYERS
    # LCM-LoRA's report: 197M (SDXL) and 67.5M (SD 1.5) LoRA parameters at rank 64.
    assert round(_parameters(sdxl, 64) / 1e6) == 197 and round(_parameters(sd15, 64) / 1e6, 1) in (67.2, 67.3)
    # SDXL-Lightning's LoRAs: 394 MB in float16 (rank 64); Hyper-SDXL's: 787 MB (rank 128), as recalled.
    assert round(_parameters(sdxl, 64) * 2 / 1e6) == 394 and round(_parameters(sdxl, 128) * 2 / 1e6) == 787


def test_every_lora_preset_names_a_published_file_of_a_known_layout() -> None:
    repos = {preset.lora.removeprefix("hf://").rsplit("/", 1)[0] for preset in PRESETS.values() if preset.lora}
    assert repos == set(PUBLISHED)
    assert all(set(layouts) <= set(LAYOUTS) for layouts in PUBLISHED.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_full_size_lora_in_each_published_layout_lands_on_every_layer(layout: str, tmp_path: Path) -> None:
    unet = _meta_unet(SDXL_UNET)
    path = _lora_file(tmp_path / f"{layout}.safetensors", unet, layout)
    assert len(file_layer_names(str(path))) == SDXL_LAYERS
    pipe = _pipeline(unet)
    unmatched = load_loras(pipe, [("published", str(path), f"hf://{layout}", 1.0)], allow_partial=False, fuse=False)
    assert unmatched == 0
    assert len(loaded_layer_names(pipe, "published")) == SDXL_LAYERS


def test_an_sd15_lora_on_sdxl_stops_the_load_naming_what_does_not_fit(tmp_path: Path) -> None:
    # latent-consistency/lcm-lora-sdv1-5 given to an SDXL preset: many module paths exist in both
    # UNets with other shapes (torch lists each one); the message counts them and names a few.
    path = _lora_file(tmp_path / "sd15.safetensors", _meta_unet(SD15_UNET), "kohya")
    with pytest.raises(ModelError, match=r"does not fit this pipeline: \d+ of its layers have other shapes") as error:
        load_loras(
            _pipeline(_meta_unet(SDXL_UNET)), [("sd15", str(path), "sd15", 1.0)], allow_partial=False, fuse=False
        )
    message = str(error.value)
    assert "down_blocks.1.attentions.0.proj_in" in message and "an SD 1.5 LoRA on SDXL?" in message
    assert len(message) < 600 and "torch.Size" not in message

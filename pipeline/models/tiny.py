"""A miniature SDXL pipeline with random weights, built offline from configs.

It has every component of SDXL (two CLIP text encoders, the text-time conditioned UNet, an
8x-downsampling VAE) at a fraction of the width, so the demo, the tests and the CPU benchmarks
exercise the real diffusers code paths without downloading weights. Weights come from a fixed
init seed, so every machine builds the same model; the CLIP tokenizer is a byte-level BPE
trained on an embedded corpus, so prompts tokenize into words rather than characters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TINY_VERSION = "1"
# The tiny Hugging Face cache's own version; 2: fp16 single-file UNets, LCM's fp16 variant.
TINY_HUB_VERSION = "2"
INIT_SEED = 0
_CORPUS = (
    "food photography, cheesecake, blueberries and jam, cinnamon, in a luxurious Michelin kitchen style, "
    "depth of field, ultra detailed, natural features. close up, woman, headdress, neon iridescent tattoos, "
    "snow forest, intricate, 8k, cinematic lighting, volumetric lighting. a fish made out of dendrobium "
    "flowers, ultrarealistic, highly detailed. macro photography of beautiful nails with manicure, painting, "
    "oil paints, gold splashes, professional color palette. video game room with a big neon sign that says "
    "arcade, cinematic, natural lighting, HDR, high resolution, shot on IMAX Laser. 3d isometric dungeon game. "
    "a photo of an astronaut riding a horse on the moon, portrait of a cat, landscape, mountains, river, city "
    "at night, the, of, and, with, on, for, by, from, red, blue, green, yellow, black, white, dog, car, house"
)


def _train_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    merges = [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    # Every byte with and without the end-of-word suffix, so no input maps to an unknown token.
    for token in [
        *chars,
        *(c + "</w>" for c in chars),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges  # type: ignore[return-value]


def _components() -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = _train_tokenizer()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    text_config = CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(INIT_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled text 32, as SDXL's layout
        cross_attention_dim=64,  # both text encoders' hidden states concatenated, as in SDXL
    )
    torch.manual_seed(INIT_SEED)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64, 64],  # four blocks: 8x downsampling, like SDXL's VAE
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=128,
        scaling_factor=0.13025,
    )
    torch.manual_seed(INIT_SEED)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(INIT_SEED)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
    }


def build_tiny_pipeline(folder: str | os.PathLike[str]) -> Path:
    """Build the tiny pipeline and save it as a diffusers-format folder."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionXLPipeline(**_components())
    pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]
    return Path(folder)


# --- A Hugging Face cache of tiny stand-ins, under the real repo ids and file names ----------
#
# With HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1, every preset resolves its real names
# (`ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors`, ...) through the same code
# as in production, but loads random-weight miniatures: for the tests and the demo's comparison.

_SNAPSHOT = "0000000000000000000000000000000000000000"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# Strong enough that a LoRA visibly changes a tiny image, small enough to stay numerically tame.
LORA_B_SCALE = 1.0


def _snapshot(hub: Path, repo_id: str) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_SNAPSHOT)
    folder = repo / "snapshots" / _SNAPSHOT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tiny_unet(base: Path, *, seed: int, **overrides: Any) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {**UNet2DConditionModel.load_config(str(base), subfolder="unet"), **overrides}
    return UNet2DConditionModel.from_config(config)


def fp16_state(module: Any) -> dict[str, Any]:
    """A module's tensors in float16, contiguous, as the published single-file UNets hold them."""
    import torch

    return {k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def save_tiny_lora(base: Path, folder: Path, weight_name: str, *, seed: int, rank: int = 4) -> Path:
    """A LoRA made with peft on the tiny UNet, saved in diffusers' LoRA format as the repos ship it."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet(base, seed=0)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.mul_(LORA_B_SCALE)
    StableDiffusionXLPipeline.save_lora_weights(
        str(folder), unet_lora_layers=get_peft_model_state_dict(unet), weight_name=weight_name
    )
    return folder / weight_name


def build_tiny_hub(hub: str | os.PathLike[str]) -> Path:
    """Populate a Hugging Face cache folder with tiny artifacts for every preset's real names."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from pipeline.models.presets import FP16_FIX_VAE, SDXL_BASE, SDXL_TURBO

    hub = Path(hub)
    complete = hub / f".sdxl-batch-tiny-hub-v{TINY_HUB_VERSION}"
    if complete.exists():
        return hub
    base = _snapshot(hub, SDXL_BASE)
    if not (base / "model_index.json").exists():
        build_tiny_pipeline(base)
    turbo = _snapshot(hub, SDXL_TURBO)
    shutil.copytree(base, turbo, dirs_exist_ok=True)
    scheduler_config = json.loads((turbo / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    (turbo / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    index = json.loads((turbo / "model_index.json").read_text())  # as stabilityai/sdxl-turbo declares it
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (turbo / "model_index.json").write_text(json.dumps(index))

    lightning = _snapshot(hub, "ByteDance/SDXL-Lightning")
    for seed, steps in enumerate((1, 2, 4, 8), start=10):
        name = f"sdxl_lightning_{steps}step_unet{'_x0' if steps == 1 else ''}.safetensors"
        save_file(fp16_state(tiny_unet(base, seed=seed)), str(lightning / name))  # fp16, as published
        if steps > 1:
            save_tiny_lora(base, lightning, f"sdxl_lightning_{steps}step_lora.safetensors", seed=seed)
    hyper = _snapshot(hub, "ByteDance/Hyper-SD")
    for seed, name in enumerate(
        ("Hyper-SDXL-1step-lora", "Hyper-SDXL-2steps-lora", "Hyper-SDXL-4steps-lora", "Hyper-SDXL-8steps-lora"),
        start=20,
    ):
        save_tiny_lora(base, hyper, f"{name}.safetensors", seed=seed)
    save_tiny_lora(
        base, _snapshot(hub, "latent-consistency/lcm-lora-sdxl"), "pytorch_lora_weights.safetensors", seed=30
    )
    save_tiny_lora(base, _snapshot(hub, "h1t/TCD-SDXL-LoRA"), "pytorch_lora_weights.safetensors", seed=31)
    # LCM-SDXL's UNet takes the guidance scale as an embedding (time_cond_proj_dim); the repo ships
    # float32 weights and an fp16 variant beside them.
    lcm = tiny_unet(base, seed=32, time_cond_proj_dim=32)
    lcm.save_pretrained(str(_snapshot(hub, "latent-consistency/lcm-sdxl")))
    lcm.half().save_pretrained(str(_snapshot(hub, "latent-consistency/lcm-sdxl")), variant="fp16")
    torch.save(fp16_state(tiny_unet(base, seed=33)), _snapshot(hub, "tianweiy/DMD2") / "dmd2_sdxl_4step_unet_fp16.bin")
    from diffusers import AutoencoderKL

    vae_folder = _snapshot(hub, FP16_FIX_VAE)
    torch.manual_seed(34)
    AutoencoderKL.from_config(AutoencoderKL.load_config(str(base), subfolder="vae")).save_pretrained(str(vae_folder))
    complete.touch()  # written last: a half-built hub is rebuilt
    return hub


if __name__ == "__main__":
    import sys

    print(build_tiny_hub(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-hub"))

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
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**_components())
    pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]
    return Path(folder)

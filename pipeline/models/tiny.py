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
from typing import Any, Literal

TINY_VERSION = "1"  # the tiny pipeline itself
# The tiny Hugging Face cache's own version; 3: float16 single-file UNets, LCM's fp16 variant,
# LoRAs in the published files' layouts.
TINY_HUB_VERSION = "3"
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
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
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
    vae = tiny_vae()
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


def tiny_vae(block_out_channels: tuple[int, ...] = (32, 32, 64, 64)) -> Any:
    """The tiny VAE: four blocks, 8x downsampling like SDXL's. Its decoder's mid-block attention is
    one head as wide as the last block (512 in SDXL's VAE)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(INIT_SEED)
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=128,
        scaling_factor=0.13025,
    )


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
# What the acceleration LoRAs adapt: the attention and feed-forward projections and, as LCM-LoRA's
# training script does (`lora_target_modules` of diffusers' train_lcm_distill_lora_sdxl_wds.py),
# every ResNet convolution, the resamplers and the time-embedding projections.
LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# Strong enough that a LoRA visibly changes a tiny image, small enough to stay numerically tame.
LORA_B_SCALE = 1.0
LoraLayout = Literal["peft", "kohya", "legacy"]
# Component name in diffusers' LoRA files -> prefix of the same component in kohya's files.
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


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


def save_tiny_unet(base: Path, target: Path, *, seed: int) -> Path:
    """A UNet state dict as the distilled checkpoints ship theirs: float16 (Lightning's
    `*_unet.safetensors`, DMD2's `*_fp16.bin`), so loading them exercises the dtype cast."""
    import torch

    state = fp16_state(tiny_unet(base, seed=seed))
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(target))
    else:
        torch.save(state, target)
    return target


def tiny_lora_layers(
    base: Path, *, seed: int, rank: int = 4, text_encoders: bool = False, unet_overrides: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A random LoRA made with peft on the tiny pipeline: per component (`unet`, and with
    `text_encoders` both CLIP encoders), the peft state dict `<module>.lora_A.weight` /
    `<module>.lora_B.weight`, scale 1 (lora_alpha = rank): W' = W + B @ A. `unet_overrides`
    trains it on a variant of the tiny UNet (a LoRA made for another architecture)."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = tiny_unet(base, seed=0, **(unet_overrides or {}))
    models: dict[str, tuple[Any, list[str]]] = {"unet": (unet, LORA_TARGETS)}
    if text_encoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        models["text_encoder"] = (CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder"), TEXT_LORA_TARGETS)
        models["text_encoder_2"] = (
            CLIPTextModelWithProjection.from_pretrained(str(base), subfolder="text_encoder_2"),
            TEXT_LORA_TARGETS,
        )
    layers = {}
    for component, (model, targets) in models.items():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        layers[component] = {k: v * LORA_B_SCALE if ".lora_B." in k else v for k, v in state.items()}
    return layers


def kohya_lora_state(layers: dict[str, dict[str, Any]], *, alpha: float, dtype: str = "float16") -> dict[str, Any]:
    """The same LoRA in kohya-ss's layout, as SDXL-Lightning, LCM-LoRA and Hyper-SD publish theirs:
    `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (text
    encoders: `lora_te1_` / `lora_te2_` + `text_model_...`), in float16.

    A loader scales each layer by alpha / rank, so `lora_up` holds B * rank / alpha: the same
    W + B @ A as the peft layout when alpha is honoured, and a different one when it is not.
    """
    import torch

    state: dict[str, Any] = {}
    for component, weights in layers.items():
        for key, down in weights.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            if component != "unet" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names CLIP modules as transformers 4 did
            up = weights[key.replace(".lora_A.", ".lora_B.")]
            name = _KOHYA_PREFIXES[component] + module.replace(".", "_")
            rank = down.shape[0]
            state[f"{name}.lora_down.weight"] = down.to(getattr(torch, dtype)).contiguous()
            state[f"{name}.lora_up.weight"] = (up * (rank / alpha)).to(getattr(torch, dtype)).contiguous()
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=getattr(torch, dtype))
    return state


def _legacy_keys(weights: dict[str, Any], *, text: bool) -> dict[str, Any]:
    down, up = (".lora_linear_layer.down.", ".lora_linear_layer.up.") if text else (".lora.down.", ".lora.up.")
    return {k.replace(".lora_A.", down).replace(".lora_B.", up): v for k, v in weights.items()}


def save_tiny_lora(
    base: Path,
    folder: Path,
    weight_name: str,
    *,
    seed: int,
    rank: int = 4,
    layout: LoraLayout = "peft",
    alpha: float | None = None,
    text_encoders: bool = False,
    unet_overrides: dict[str, Any] | None = None,
) -> Path:
    """A random LoRA on the tiny pipeline saved in the layout its published counterpart uses:
    `peft` (diffusers' `save_lora_weights`: `unet.<module>.lora_A.weight`, float32), `kohya`
    (see `kohya_lora_state`; `alpha` defaults to half the rank, so the alpha scaling matters) or
    `legacy` (diffusers before peft: `unet.<module>.lora.down.weight`, text encoders
    `<module>.lora_linear_layer.down.weight`). The same seed gives the same LoRA in every layout."""
    layers = tiny_lora_layers(base, seed=seed, rank=rank, text_encoders=text_encoders, unet_overrides=unet_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "kohya":
        from safetensors.torch import save_file

        save_file(kohya_lora_state(layers, alpha=alpha or rank / 2), str(folder / weight_name))
        return folder / weight_name
    if layout == "legacy":
        layers = {component: _legacy_keys(weights, text=component != "unet") for component, weights in layers.items()}
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        weight_name=weight_name,
    )
    return folder / weight_name


def build_tiny_hub(hub: str | os.PathLike[str]) -> Path:
    """Populate a Hugging Face cache folder with tiny artifacts for every preset's real names."""
    import shutil

    import torch

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

    # Each file in the layout and precision of its published counterpart: float16 UNet state dicts,
    # kohya-layout float16 LoRAs with conv and time-embedding layers (Lightning, Hyper-SD, LCM-LoRA),
    # and TCD-LoRA in diffusers' peft layout.
    lightning = _snapshot(hub, "ByteDance/SDXL-Lightning")
    for seed, steps in enumerate((1, 2, 4, 8), start=10):
        save_tiny_unet(
            base, lightning / f"sdxl_lightning_{steps}step_unet{'_x0' if steps == 1 else ''}.safetensors", seed=seed
        )
        if steps > 1:
            save_tiny_lora(base, lightning, f"sdxl_lightning_{steps}step_lora.safetensors", seed=seed, layout="kohya")
    hyper = _snapshot(hub, "ByteDance/Hyper-SD")
    for seed, name in enumerate(
        ("Hyper-SDXL-1step-lora", "Hyper-SDXL-2steps-lora", "Hyper-SDXL-4steps-lora", "Hyper-SDXL-8steps-lora"),
        start=20,
    ):
        save_tiny_lora(base, hyper, f"{name}.safetensors", seed=seed, layout="kohya")
    lcm_lora = _snapshot(hub, "latent-consistency/lcm-lora-sdxl")
    save_tiny_lora(base, lcm_lora, "pytorch_lora_weights.safetensors", seed=30, layout="kohya")
    save_tiny_lora(base, _snapshot(hub, "h1t/TCD-SDXL-LoRA"), "pytorch_lora_weights.safetensors", seed=31)
    # LCM-SDXL's UNet takes the guidance scale as an embedding (time_cond_proj_dim); the repo ships
    # float32 weights and an fp16 variant beside them.
    lcm = tiny_unet(base, seed=32, time_cond_proj_dim=32)
    lcm.save_pretrained(str(_snapshot(hub, "latent-consistency/lcm-sdxl")))
    lcm.half().save_pretrained(str(_snapshot(hub, "latent-consistency/lcm-sdxl")), variant="fp16")
    save_tiny_unet(base, _snapshot(hub, "tianweiy/DMD2") / "dmd2_sdxl_4step_unet_fp16.bin", seed=33)
    from diffusers import AutoencoderKL

    vae_folder = _snapshot(hub, FP16_FIX_VAE)
    torch.manual_seed(34)
    AutoencoderKL.from_config(AutoencoderKL.load_config(str(base), subfolder="vae")).save_pretrained(str(vae_folder))
    complete.touch()  # written last: a half-built hub is rebuilt
    return hub


if __name__ == "__main__":
    import sys

    print(build_tiny_hub(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-hub"))

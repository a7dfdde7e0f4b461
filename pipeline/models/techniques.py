"""The speed switches of `model.*` (each measured on its own by benchmarks/gpu_throughput.py):
attention kernels, q/k/v fusion, memory layouts, and `torch.compile` with the padding that keeps
its shapes few."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.config import ModelConfig


def apply_techniques(
    pipe: Any, model: ModelConfig, *, device: str, loras_fused: bool, compile_backend: Any
) -> list[str]:
    """The speed switches of `model` (each measured on its own by benchmarks/gpu_throughput.py);
    returns the names of those applied. Layout and fusion switches act on CUDA only."""
    import torch

    applied = []
    on_cuda = device == "cuda"
    if model.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
        applied.append("attention=eager")
    elif model.attention == "flash":
        applied.append("attention=flash")  # a kernel choice around the denoising loop, see `generate`
    # `loras_fused`: no LoRA left unfused (unfused LoRA layers wrap the separate q/k/v projections).
    if model.fuse_qkv and on_cuda and model.attention != "eager" and loras_fused:
        fuse_qkv(pipe)
        applied.append("fuse_qkv")
    if model.channels_last and on_cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if model.vae_channels_last and on_cuda:
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("vae_channels_last")
    if model.compile:
        # Compiled lazily, on the first call; `ImageGenerator._padded` pads calls to a few shapes per (size, CFG).
        # A manifest of many sizes, or `tune` sweeping batch sizes on one loaded model, needs
        # more shapes than dynamo's default of 8 per function, past which the UNet silently runs
        # uncompiled (and a tuned rate would be an eager one).
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_SHAPES)
        pipe.unet = torch.compile(pipe.unet, backend=compile_backend, fullgraph=False, dynamic=False)
        applied.append("compile")
    return applied


def attention_kernels(attention: str) -> Any:
    """`attention: flash` restricts PyTorch's SDPA to the flash kernel. `ImageGenerator.generate` enters it
    around the denoising loop only: the UNet's attention heads are 64 wide, within the kernel's
    limit of 256, while the VAE's mid-block attention is one head of 512, which the kernel refuses
    ("No available kernel"). The text encoders (one pass per call) keep SDPA's own choice."""
    from contextlib import nullcontext

    if attention != "flash":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def padded_size(rows: int) -> int:
    """The batch a compiled call of `rows` rows runs at: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


# Compiled UNet shapes an actor keeps: (size, CFG) groups x the batch sizes `tune` sweeps on it.
COMPILED_SHAPES = 64


def fuse_qkv(pipe: Any) -> int:
    """Fuse the q/k/v projections of every attention block of the UNet and the VAE (one matmul
    instead of three; k/v only for cross-attention), then drop the separate projections the fused
    processor no longer reads. diffusers keeps them so that `unfuse_qkv_projections` can restore
    them; we never unfuse, and kept they cost 1.2 GB per actor in bfloat16. Returns the number of
    parameters dropped."""
    from diffusers.models.attention_processor import Attention

    pipe.fuse_qkv_projections(unet=True, vae=True)
    dropped = 0
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            if not (isinstance(module, Attention) and getattr(module, "fused_projections", False)):
                continue
            for name in ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"):
                dropped += sum(param.numel() for param in getattr(module, name).parameters())
                delattr(module, name)
        model.original_attn_processors = None  # nothing left to unfuse to
    return dropped

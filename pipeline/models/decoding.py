"""Latents to pixels: SDXL's VAE decode as diffusers does it, and the uint8 images that cross to the host."""

from __future__ import annotations

from typing import Any

# Pixels decoded per VAE call by default: 4 images at 1024², 16 at 512². SDXL's decoder holds
# several 128- to 512-channel feature maps at full resolution per image (GBs at 1024²), so an
# undivided batch of 16 could need more memory than the UNet's whole denoising loop.
DECODE_PIXELS = 4 * 1024 * 1024


def vae_needs_float32(vae: Any) -> bool:
    """Whether a float16 VAE must decode in float32 (SDXL's own VAE overflows in float16; its
    config says so with `force_upcast`, as diffusers' pipeline reads it)."""
    import torch

    return bool(vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False))


def decode_latents(pipe: Any, latents: Any) -> Any:
    """Latents → images in [-1, 1], as StableDiffusionXLPipeline does after denoising (latents in
    the VAE's dtype, latent denormalisation, watermark if any). A float16 VAE that needs float32
    is float32 from load (`ImageGenerator.adopt`), where diffusers casts it around every call."""
    import torch

    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return image


def to_uint8(images: Any) -> Any:
    """Decoded images in [-1, 1], (N, 3, H, W) → uint8 (N, H, W, 3) on their device, with the
    arithmetic of diffusers' `VaeImageProcessor.postprocess` + `numpy_to_pil`: denormalised in the
    images' dtype, then scaled to 255 and rounded in float32. Scaled in bfloat16, 8% of the values
    would round to a neighbouring level. Only uint8 crosses to the host (4x fewer bytes)."""
    import torch

    images = (images * 0.5 + 0.5).clamp(0, 1)
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

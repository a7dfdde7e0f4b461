"""The model behind a thin wrapper: `ImageGenerator.load()` once, then `generate(...)` per batch.

Reproducibility contract: each image's initial noise comes from its own CPU `torch.Generator`
seeded with the row's seed, also inside a batch. diffusers draws each latent from its own
generator when given a list, so an image depends only on (model, prompt, seed, settings), and a
plain diffusers call with `generator=torch.Generator("cpu").manual_seed(seed)` reproduces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelError
from pipeline.models.presets import Preset, get_preset
from pipeline.models.weights import default_cache_dir, resolve_pipeline_source, resolve_weights_file

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.config import ModelConfig, StorageConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderSettings:
    """Settings shared by every image of one model call; rows batch only with equal settings."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    negative: bool = False


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible to this actor")
    return requested


def choose_dtype(requested: str, device: str) -> torch.dtype:
    import torch

    if requested == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype: torch.dtype = getattr(torch, requested)
    return dtype


def make_scheduler(preset: Preset, stored: Any) -> Any:
    """The preset's scheduler built from the pipeline's stored config plus the preset's overrides."""
    if preset.scheduler == "stored":
        return stored
    import diffusers

    scheduler_class = getattr(diffusers, preset.scheduler)
    return scheduler_class.from_config(stored.config, **preset.scheduler_config)


def _quiet_libraries() -> None:
    """Silence download/loading progress bars and info chatter that would flood the driver's log
    from every actor; warnings (e.g. prompt truncation) still come through."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class ImageGenerator:
    """Holds one diffusers SDXL pipeline and renders batches of prompts with per-row seeds."""

    def __init__(self, model: ModelConfig, storage: StorageConfig | None = None):
        self.model = model
        self.storage = storage
        self.preset = get_preset(model.preset)
        self.pipe: Any = None
        self.device = "cpu"

    @property
    def model_name(self) -> str:
        return self.preset.name

    def load(self) -> None:
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        cache_dir = default_cache_dir(self.model.cache_dir)
        self.device = choose_device(self.model.device)
        dtype = choose_dtype(self.model.dtype, self.device)
        source = resolve_pipeline_source(self.model.path or self.preset.base, storage=self.storage, cache_dir=cache_dir)
        _quiet_libraries()
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.model.variant:
            kwargs["variant"] = self.model.variant
        unet_ref = self.model.unet or self.preset.unet
        try:
            if unet_ref:
                kwargs["unet"] = self._load_unet(UNet2DConditionModel, source, unet_ref, cache_dir).to(dtype)
            pipe = StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
        except ModelError:
            raise
        except OSError as error:
            raise ModelError(f"cannot load the pipeline from {source!r}: {error}") from None
        pipe.scheduler = make_scheduler(self.preset, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        logger.info("loaded %s from %s on %s (%s)", self.preset.name, source, self.device, dtype)

    def _load_unet(self, unet_class: Any, source: str, ref: str, cache_dir: Any) -> Any:
        from safetensors.torch import load_file

        unet = unet_class.from_config(unet_class.load_config(source, subfolder="unet"))
        path = resolve_weights_file(ref, storage=self.storage, cache_dir=cache_dir)
        try:
            unet.load_state_dict(load_file(path))
        except RuntimeError as error:
            raise ModelError(f"UNet weights {ref} do not fit the base pipeline's UNet: {str(error)[:500]}") from None
        return unet

    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], settings: RenderSettings
    ) -> np.ndarray:
        """Render one batch; returns uint8 pixels of shape (N, height, width, 3)."""
        import torch

        if self.pipe is None:
            raise RuntimeError("ImageGenerator.generate() called before load()")
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        negatives = [n or "" for n in negative_prompts] if settings.negative else None
        with torch.inference_mode():
            images = self.pipe(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                width=settings.width,
                height=settings.height,
                generator=generators,
                output_type="pt",
            ).images
            # Quantise on the device: the copy back moves 4x fewer bytes than float32.
            pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        result: np.ndarray = pixels.cpu().numpy()
        return result

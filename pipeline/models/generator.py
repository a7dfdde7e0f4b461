"""The model behind a thin wrapper: `ImageGenerator.load()` once, then `generate(...)` per batch.

Reproducibility contract: each image's initial noise comes from its own CPU `torch.Generator`
seeded with the row's seed, also inside a batch. diffusers draws each latent from its own
generator when given a list, so an image depends only on (model, prompt, seed, settings), and a
plain diffusers call with `generator=torch.Generator("cpu").manual_seed(seed)` reproduces it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelError
from pipeline.models.loading import load_unet_file
from pipeline.models.presets import FP16_FIX_VAE, Preset, get_preset
from pipeline.models.weights import (
    default_cache_dir,
    fp16_variant,
    is_file_ref,
    resolve_folder,
    resolve_pipeline_source,
    resolve_weights_file,
)

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
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    # Per-load notices that say nothing actionable about our usage.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    logging.getLogger("diffusers.loaders.lora_base").setLevel(logging.ERROR)
    logging.getLogger("diffusers.loaders.lora_pipeline").setLevel(logging.ERROR)
    # diffusers warns about every truncated prompt, in every batch; the stage records truncation
    # per row instead (metadata `prompt_truncated`) and the driver warns once with a count.
    logging.getLogger("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def is_out_of_memory(error: BaseException) -> bool:
    """True for an accelerator (or host) allocation failure, which a smaller batch may avoid."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message.lower() or "can't allocate memory" in message
    )


class ImageGenerator:
    """Holds one diffusers SDXL pipeline and renders batches of prompts with per-row seeds."""

    def __init__(self, model: ModelConfig, storage: StorageConfig | None = None):
        self.model = model
        self.storage = storage
        self.preset = get_preset(model.preset)
        self.pipe: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.techniques: list[str] = []  # speed switches applied at load
        self.cache_dir = default_cache_dir(model.cache_dir)
        # Largest model call that fits: None until an out-of-memory error lowers it.
        self.max_batch: int | None = None
        self.oom_retries = 0
        self.stage_seconds: dict[str, float] = {}  # seconds per phase, summed over calls

    @property
    def model_name(self) -> str:
        return self.preset.name

    def load(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.cache_dir = default_cache_dir(self.model.cache_dir)
        self.device = choose_device(self.model.device)
        self.dtype = choose_dtype(self.model.dtype, self.device)
        _quiet_libraries()
        source = resolve_pipeline_source(
            self.model.path or self.preset.base, storage=self.storage, cache_dir=self.cache_dir
        )
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.model.variant:
            kwargs["variant"] = self.model.variant
        try:
            unet_ref = self.model.unet or self.preset.unet
            if unet_ref:
                kwargs["unet"] = self._load_unet(source, unet_ref)
            vae_ref = self.vae_ref()
            if vae_ref:
                kwargs["vae"] = self._load_vae(vae_ref)
            pipe = StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
        except ModelError:
            raise
        except OSError as error:
            raise ModelError(
                f"cannot load the pipeline from {source!r}: {error} (with HF_HUB_OFFLINE set, only weights already "
                "in the Hugging Face cache are available)"
            ) from None
        self.adopt(pipe)
        logger.info("loaded %s from %s on %s (%s)", self.preset.name, source, self.device, self.dtype)

    def adopt(self, pipe: Any) -> None:
        """Make a loaded SDXL pipeline this generator's: the preset's scheduler, LoRAs, the
        device, and the speed switches. (`load` calls it; the GPU benchmark hands it a pipeline
        of the full SDXL architecture with random weights.)"""
        if self.dtype is None:
            self.device = choose_device(self.model.device)
            self.dtype = choose_dtype(self.model.dtype, self.device)
        pipe.scheduler = make_scheduler(self.preset, pipe.scheduler)
        self._apply_loras(pipe)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.techniques = self._apply_techniques(self.pipe)

    def vae_ref(self) -> str | None:
        """The VAE to load instead of the pipeline's own, if any.

        SDXL's VAE overflows to NaN (black images) in float16; the fp16-fix VAE was finetuned to
        keep activations in range, so float16 runs use it unless told otherwise.
        """
        import torch

        if self.model.vae:
            return self.model.vae
        if self.dtype == torch.float16 and self.model.fp16_fix_vae and self.preset.fp16_fix_vae:
            return FP16_FIX_VAE
        return None

    def _load_unet(self, source: str, ref: str) -> Any:
        """The UNet of `ref`: a diffusers folder (its fp16 variant for a 16-bit model, where it has
        one), or a single checkpoint file in the base pipeline's UNet config, streamed straight
        into the model's dtype on its device (see `pipeline.models.loading`)."""
        from diffusers import UNet2DConditionModel

        if not is_file_ref(ref):
            folder = resolve_folder(ref, storage=self.storage, cache_dir=self.cache_dir, marker="config.json")
            variant = fp16_variant(folder, self.dtype)
            return UNet2DConditionModel.from_pretrained(folder, dtype=self.dtype, variant=variant)
        config = UNet2DConditionModel.load_config(source, subfolder="unet")
        path = resolve_weights_file(ref, storage=self.storage, cache_dir=self.cache_dir)
        return load_unet_file(config, path, dtype=self.dtype, device=self.device, name=ref)

    def _load_vae(self, ref: str) -> Any:
        from diffusers import AutoencoderKL

        folder = resolve_folder(ref, storage=self.storage, cache_dir=self.cache_dir, marker="config.json")
        return AutoencoderKL.from_pretrained(folder, dtype=self.dtype)

    def lora_refs(self) -> list[tuple[str, str, float]]:
        """(adapter name, weights reference, weight) of the acceleration LoRA and any style LoRAs."""
        adapters = []
        acceleration = self.model.lora or self.preset.lora
        if acceleration:
            adapters.append(("acceleration", acceleration, 1.0))
        adapters.extend((f"style_{i}", lora.path, lora.weight) for i, lora in enumerate(self.model.loras))
        return adapters

    def _apply_loras(self, pipe: Any) -> None:
        """Load LoRAs through peft and, by default, fuse them into the base weights.

        Unfused, every LoRA-wrapped layer runs two extra small matmuls per call; fusing folds
        W + scale * B @ A into W once at load, and unloading the adapters afterwards removes the
        wrappers, so a LoRA preset then costs exactly what the full model costs per image.
        """
        adapters = self.lora_refs()
        if not adapters:
            return
        for name, ref, _ in adapters:
            path = resolve_weights_file(ref, storage=self.storage, cache_dir=self.cache_dir)
            try:
                pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as error:
                raise ModelError(f"LoRA {ref} does not fit this pipeline: {str(error)[:500]}") from None
        names = [name for name, _, _ in adapters]
        pipe.set_adapters(names, adapter_weights=[weight for _, _, weight in adapters])
        if self.model.fuse_loras:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()

    def _apply_techniques(self, pipe: Any) -> list[str]:
        """The speed switches of `model` (each measured on its own by benchmarks/gpu_throughput.py);
        returns the names of those applied. Layout and fusion switches act on CUDA only."""
        import torch

        applied = []
        on_cuda = self.device == "cuda"
        if self.model.attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            pipe.unet.set_attn_processor(AttnProcessor())
            pipe.vae.set_attn_processor(AttnProcessor())
            applied.append("attention=eager")
        elif self.model.attention == "flash":
            applied.append("attention=flash")  # a kernel choice around each call, see `generate`
        # After LoRA fusion: unfused LoRA layers wrap the separate q/k/v projections.
        loras_fused = self.model.fuse_loras or not self.lora_refs()
        if self.model.fuse_qkv and on_cuda and self.model.attention != "eager" and loras_fused:
            pipe.fuse_qkv_projections(unet=True, vae=True)
            applied.append("fuse_qkv")
        if self.model.channels_last and on_cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            applied.append("channels_last")
        if self.model.compile:
            # Compiled lazily: the first call of each batch shape pays the compilation.
            pipe.unet = torch.compile(pipe.unet, fullgraph=False, dynamic=False)
            applied.append("compile")
        return applied

    def _attention_kernels(self) -> Any:
        """`attention: flash` restricts PyTorch's SDPA to the flash kernel (CUDA, fp16/bf16)."""
        from contextlib import nullcontext

        if self.model.attention != "flash" or self.device != "cuda":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def peak_memory_mb(self) -> float:
        """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
        import torch

        if self.device == "cuda":
            return float(torch.cuda.max_memory_allocated()) / 2**20
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # Linux reports KiB

    def token_counts(self, texts: list[str | None]) -> tuple[list[int], int]:
        """Tokens of each text as the text encoders see it (with start/end tokens; 0 for None),
        and the encoders' limit (77 for SDXL's CLIP encoders). Longer texts are truncated by the
        pipeline: SDXL and its distilled variants were trained on 77-token prompts."""
        if self.pipe is None:
            raise RuntimeError("ImageGenerator.token_counts() called before load()")
        tokenizer = self.pipe.tokenizer or self.pipe.tokenizer_2
        present = [t for t in texts if t]
        ids = tokenizer(present, truncation=False, padding=False)["input_ids"] if present else []
        lengths = iter(len(i) for i in ids)
        return [next(lengths) if t else 0 for t in texts], int(tokenizer.model_max_length)

    def render(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], settings: RenderSettings
    ) -> tuple[np.ndarray, list[int]]:
        """Render rows in model calls that fit in memory; returns the pixels and, per row, the
        size of the call that rendered it.

        On an out-of-memory error the call is split in half and retried, and the actor keeps the
        smaller size for later calls (`max_batch`, `oom_retries`). Each image depends only on its
        own seed, so splitting does not change the images. A single image that does not fit
        stops the job with a ModelError.
        """
        import numpy as np

        images: list[np.ndarray] = []
        sizes: list[int] = []
        start = 0
        while start < len(prompts):
            size = min(self.max_batch or len(prompts), len(prompts) - start)
            end = start + size
            try:
                pixels = self.generate(prompts[start:end], negative_prompts[start:end], seeds[start:end], settings)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                self._free_memory()
                self.oom_retries += 1
                if size == 1:
                    raise ModelError(
                        f"one {settings.width}x{settings.height} image does not fit in the {self.device} memory of "
                        f"this actor ({type(error).__name__}); lower the resolution, use a 16-bit model.dtype, or "
                        "give each actor a whole GPU (resources.gpus_per_actor: 1)"
                    ) from None
                self.max_batch = size // 2
                logger.warning(
                    "out of memory rendering %d images at %dx%d: retrying in calls of %d",
                    size,
                    settings.width,
                    settings.height,
                    self.max_batch,
                )
                continue
            images.append(pixels)
            sizes.extend([size] * size)
            start = end
        return np.concatenate(images), sizes

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], settings: RenderSettings
    ) -> np.ndarray:
        """Render one batch; returns uint8 pixels of shape (N, height, width, 3).

        Runs diffusers' SDXL pipeline in timed phases (text encoding, denoising, VAE decoding,
        the copy to the host) with the same arithmetic as one `pipe(...)` call; the seconds of each
        phase are added to `stage_seconds` (on CUDA, each phase ends with a synchronize)."""
        import torch

        if self.pipe is None:
            raise RuntimeError("ImageGenerator.generate() called before load()")
        pipe = self.pipe
        timer = StageTimer(self.device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        negatives = [n or "" for n in negative_prompts] if settings.negative else None
        # The full LCM UNet takes guidance as an embedding, not as classifier-free guidance.
        cfg = settings.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        with torch.inference_mode(), self._attention_kernels():
            with timer("text_encode"):
                embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=prompts,
                    device=torch.device(self.device),
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=negatives,
                )
            with timer("denoise"):
                latents = pipe(
                    prompt_embeds=embeds,
                    negative_prompt_embeds=negative_embeds,
                    pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    width=settings.width,
                    height=settings.height,
                    generator=generators,
                    output_type="latent",
                    **self.preset.call_kwargs,
                ).images
            with timer("vae_decode"):
                chunk = self.model.vae_batch_size or len(prompts)
                images = torch.cat(
                    [decode_latents(pipe, latents[i : i + chunk]) for i in range(0, len(latents), chunk)]
                )
            with timer("to_host"):
                # Quantise on the device: the copy back moves 4x fewer bytes than float32.
                pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                result: np.ndarray = self._to_host(pixels)
        for stage, seconds in timer.seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        return result

    def _to_host(self, pixels: Any) -> np.ndarray:
        """Device pixels → numpy; on CUDA (with `pinned_copy`) through page-locked memory, an
        asynchronous copy that the stage timer's synchronize waits for."""
        import torch

        if self.device != "cuda" or not self.model.pinned_copy:
            host: np.ndarray = pixels.cpu().numpy()
            return host
        buffer = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        buffer.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        pinned: np.ndarray = buffer.numpy()
        return pinned


class StageTimer:
    """Wall seconds per named phase; on CUDA each phase ends with a synchronize, so queued GPU
    work is counted in the phase that queued it."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def decode_latents(pipe: Any, latents: Any) -> Any:
    """Latents → images in [-1, 1], exactly as StableDiffusionXLPipeline does after denoising
    (float32 upcast of an fp16 VAE that needs it, latent denormalisation, watermark if any)."""
    import torch

    vae = pipe.vae
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        pipe.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return image

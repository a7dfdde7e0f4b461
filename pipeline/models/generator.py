"""The model behind a thin wrapper: `ImageGenerator.load()` once, then `generate(...)` per batch.

Reproducibility contract: each image's initial noise comes from its own CPU `torch.Generator`
seeded with the row's seed, also inside a batch. diffusers draws each latent from its own
generator when given a list, so an image depends only on (model, prompt, seed, settings), and a
plain diffusers call with `generator=torch.Generator("cpu").manual_seed(seed)` reproduces it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ModelError
from pipeline.core.render import RenderSettings
from pipeline.models.decoding import DECODE_PIXELS, decode_latents, to_uint8, vae_needs_float32
from pipeline.models.devices import choose_device, choose_dtype, is_out_of_memory
from pipeline.models.loading import load_unet_file
from pipeline.models.presets import Preset, get_preset, vae_label, vae_source
from pipeline.models.techniques import apply_techniques, attention_kernels, padded_size
from pipeline.models.timing import StageTimer
from pipeline.models.weights import (
    default_cache_dir,
    fp16_variant,
    is_file_ref,
    pipeline_fp16_variant,
    resolve_folder,
    resolve_pipeline_source,
    resolve_weights_file,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.core.config import ModelConfig, StorageConfig

logger = logging.getLogger(__name__)


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
    # With HF_HUB_OFFLINE set, every actor's load said that it could not reach the Hub and would
    # use the cache: what the user asked for. Those two lines alone are dropped.
    for name in ("diffusers.pipelines.pipeline_utils", "huggingface_hub.hf_api"):
        hub_logger = logging.getLogger(name)
        if not any(isinstance(f, OfflineHubNotices) for f in hub_logger.filters):
            hub_logger.addFilter(OfflineHubNotices())


class OfflineHubNotices(logging.Filter):
    """Drops "Couldn't connect to the Hub" / "Could not reach the Hub" when HF_HUB_OFFLINE is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        from huggingface_hub import constants

        notice = record.getMessage().startswith(("Couldn't connect to the Hub", "Could not reach the Hub"))
        return not (notice and constants.HF_HUB_OFFLINE)


_NO_WATERMARKER = (
    "model.watermark is set but diffusers has no watermarker: install `invisible-watermark` on the workers "
    "(pip install invisible-watermark), or set model.watermark: false"
)


def _watermark_available() -> bool:
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl

    # The pipeline module's own name: what its constructor reads (and what a test stands in for).
    return bool(pipeline_stable_diffusion_xl.is_invisible_watermark_available())  # type: ignore[attr-defined]


class ImageGenerator:
    """Holds one diffusers SDXL pipeline and renders batches of prompts with per-row seeds."""

    # torch.compile's backend; the tests put a counting backend here.
    compile_backend: Any = "inductor"

    def __init__(self, model: ModelConfig, storage: StorageConfig | None = None, *, batch_size: int | None = None):
        """`batch_size`: the largest model call the actor makes (`generation.batch_size`); with
        `model.compile`, smaller calls are padded to it so that the compiled UNet keeps one shape."""
        self.model = model
        self.storage = storage
        self.batch_size = batch_size
        self.preset = get_preset(model.preset)
        self.pipe: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.techniques: list[str] = []  # speed switches applied at load
        self.cache_dir = default_cache_dir(model.cache_dir)
        # Largest model call that fits: None until an out-of-memory error lowers it.
        self.max_batch: int | None = None
        # Pixels the VAE may decode in one call: None until an out-of-memory error while decoding lowers it.
        self.max_decode_pixels: int | None = None
        self.oom_retries = 0
        # False: an out-of-memory error raises instead of splitting the call (`tune`'s memory probe,
        # where a batch size that does not fit as asked is the finding).
        self.split_on_oom = True
        self.stage_seconds: dict[str, float] = {}  # seconds per phase, summed over calls
        # Seconds inside the UNet's forward passes, summed over calls: within `denoise`, so kept
        # apart from the phases. Denoising less this is the GPU's idle time between steps.
        self.unet_seconds = 0.0
        self._timer: StageTimer | None = None
        self.lora_layers_unmatched = 0  # layers of partly matching LoRAs left out (`allow_partial_lora`)

    @property
    def model_name(self) -> str:
        return self.preset.name

    @property
    def dtype_name(self) -> str:
        """The precision the model runs in, as torch names it (`bfloat16`, ...); "" before `load`."""
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else ""

    def vae_label(self) -> str:
        """Which VAE decodes (`presets.vae_label`): recorded in every metadata row."""
        return vae_label(self.model, self.preset, self.dtype_name)

    def configure(self, *, batch_size: int, vae_batch_size: int | None, split_on_oom: bool = True) -> None:
        """Change how rows are batched on the loaded model (no reload): `tune` sweeps these on one
        model. Forgets the sizes earlier out-of-memory errors lowered, and the peak memory."""
        self.batch_size = batch_size
        self.model = self.model.model_copy(update={"vae_batch_size": vae_batch_size})
        self.split_on_oom = split_on_oom
        self.max_batch = None
        self.max_decode_pixels = None
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def total_memory_mb(self) -> float | None:
        """The GPU's memory (None on CPU): what `tune --max-memory-fraction` compares the peak with."""
        if self.device != "cuda":
            return None
        import torch

        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) / 2**20

    def load(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.cache_dir = default_cache_dir(self.model.cache_dir)
        self.device = choose_device(self.model.device)
        self.dtype = choose_dtype(self.model.dtype, self.device)
        self._check_precision()
        self._check_attention()
        _quiet_libraries()
        source = resolve_pipeline_source(
            self.model.path or self.preset.base, storage=self.storage, cache_dir=self.cache_dir
        )
        if self.model.watermark and not _watermark_available():
            raise ModelError(_NO_WATERMARKER)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "add_watermarker": self.model.watermark}
        unet_ref = self.model.unet or self.preset.unet
        variant = self.model.variant or self._base_variant(source, unet_ref)
        if variant:
            kwargs["variant"] = variant
        try:
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
        """Make a loaded SDXL pipeline (in `self.dtype`) this generator's: the preset's scheduler,
        the device, then the LoRAs (loaded and fused there), and the speed switches."""
        import torch

        pipe.scheduler = make_scheduler(self.preset, pipe.scheduler)
        self._check_watermark(pipe)
        pipe.set_progress_bar_config(disable=True)
        # On the device before the LoRAs: peft merges each layer in float32 where its weight is,
        # under a second for an SDXL LoRA on a GPU, 10-30 s on the actor's one CPU thread.
        pipe = pipe.to(self.device)
        self._apply_loras(pipe)
        self.pipe = pipe
        self.techniques = apply_techniques(
            self.pipe,
            self.model,
            device=self.device,
            loras_fused=self.model.fuse_loras or not self.lora_refs(),
            compile_backend=self.compile_backend,
        )
        self._time_unet_forwards(self.pipe.unet)
        if vae_needs_float32(self.pipe.vae):
            # diffusers casts such a VAE to float32 and back around every decode (twice per chunk,
            # with a deprecation warning each time), and an error in between leaves it in float32
            # for the next call. Kept in float32 from load, it has one state; latents are cast.
            self.pipe.vae.to(dtype=torch.float32)
            self.techniques.append("vae=float32")

    def _base_variant(self, source: str, unet_ref: str | None) -> str | None:
        """The fp16 files of the base pipeline for a 16-bit model, where it has them (`model.variant`
        unset); else its default files, saying so: they are twice the bytes to read and convert."""
        import torch

        if self.dtype not in (torch.float16, torch.bfloat16):
            return None
        variant = pipeline_fp16_variant(source, self.dtype, component="text_encoder_2" if unet_ref else "unet")
        if variant is None:
            logger.info("no fp16 variant in %s: loading its default (float32) files into %s", source, self.dtype)
        return variant

    def _check_watermark(self, pipe: Any) -> None:
        """The invisible watermark only where `model.watermark` asks for it: diffusers builds it
        whenever `invisible-watermark` is installed, and it would then run on this actor's CPU
        thread after every decode (`decode_latents`)."""
        if not self.model.watermark:
            pipe.watermark = None
        elif getattr(pipe, "watermark", None) is None:
            raise ModelError(_NO_WATERMARKER)

    def _check_precision(self) -> None:
        """A job resolves `dtype: auto` once for all its GPU types (`core.accelerators`); a GPU
        without bfloat16 given bfloat16 (a type named wrongly, or a config set by hand) would run
        it emulated and slowly, or fail in the first kernel."""
        import torch

        if self.device == "cuda" and self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelError(
                f"model.dtype is bfloat16 and this actor's GPU ({torch.cuda.get_device_name()}) has no bfloat16: "
                "set model.dtype to float16 for a fleet that includes it, or leave it out of the job's fleet"
            )

    def _check_attention(self) -> None:
        """`attention: flash` with a precision the flash kernel lacks (float32 by `dtype: auto` on
        CPU; an explicit float32 is refused when the config is validated)."""
        import torch

        if self.model.attention == "flash" and self.dtype not in (torch.float16, torch.bfloat16):
            raise ModelError(
                f"attention: flash needs float16 or bfloat16, and model.dtype resolved to {self.dtype} on "
                f"{self.device}: set model.dtype to bfloat16 (or float16), or attention to sdpa"
            )

    def vae_ref(self) -> str | None:
        """The VAE to load instead of the pipeline's own, if any (`presets.vae_source`)."""
        return vae_source(self.model, self.preset, self.dtype_name)

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
        """The acceleration and style LoRAs, loaded, checked and (by default) fused (`models.lora`)."""
        from pipeline.models.lora import load_loras

        self.lora_layers_unmatched = load_loras(
            pipe,
            [(name, resolve_weights_file(ref, storage=self.storage, cache_dir=self.cache_dir), ref, weight)
             for name, ref, weight in self.lora_refs()],
            allow_partial=self.model.allow_partial_lora,
            fuse=self.model.fuse_loras,
        )  # fmt: skip

    def _time_unet_forwards(self, unet: Any) -> None:
        """Time every UNet forward pass (hooks on the module the pipeline calls, outside a compiled
        graph): events on CUDA, read at the call's one synchronize. The phases span the whole call
        on the GPU's timeline, so their share of wall time is about 1 by construction; the share of
        the UNet's passes (with the VAE's decode) is not, and falls when the host holds the GPU up
        between steps (scheduler steps, synchronising copies)."""

        def before(*_: Any) -> None:
            if self._timer is not None:
                self._timer.start("unet")

        def after(*_: Any) -> None:
            if self._timer is not None:
                self._timer.stop("unet")

        unet.register_forward_pre_hook(before)
        unet.register_forward_hook(after)

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
        self,
        prompts: list[str],
        negative_prompts: list[str | None],
        seeds: list[int],
        settings: RenderSettings,
        out: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """Render rows in model calls that fit in memory; returns the pixels (N, height, width, 3)
        and, per row, the size of the call that rendered it. `out`: see `generate`.

        On an out-of-memory error the call is split in half and retried, and the actor keeps the
        smaller size for later calls (`max_batch`, `oom_retries`). Each image depends only on its
        own seed, so splitting does not change the images. A single image that does not fit
        stops the job with a ModelError.
        """
        if out is None:
            out = self.host_pixels(len(prompts), settings)
        sizes: list[int] = []
        start = 0
        while start < len(prompts):
            size = min(self.max_batch or self.batch_size or len(prompts), len(prompts) - start)
            end = start + size
            try:
                self.generate(
                    prompts[start:end], negative_prompts[start:end], seeds[start:end], settings, out=out[start:end]
                )
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if size == 1:
                    raise ModelError(
                        f"one {settings.width}x{settings.height} image does not fit in the {self.device} memory of "
                        f"this actor ({type(error).__name__}); lower the resolution, use a 16-bit model.dtype, or "
                        "give each actor a whole GPU (resources.gpus_per_actor: 1)"
                    ) from None
            else:
                sizes.extend([size] * size)
                start = end
                continue
            # Out of memory. Freed here, after the except block: until it ends, the traceback keeps
            # the failed call's frames, and with them its activations, alive.
            self._free_memory()
            if not self.split_on_oom:
                raise ModelError(self._out_of_memory(size, settings))
            self.oom_retries += 1
            self.max_batch = size // 2
            logger.warning(
                "out of memory rendering %d images at %dx%d: retrying in calls of %d",
                size,
                settings.width,
                settings.height,
                self.max_batch,
            )
        pixels: np.ndarray = out.numpy()
        return pixels, sizes

    def _out_of_memory(self, size: int, settings: RenderSettings, *, decoding: bool = False) -> str:
        what = "decoding" if decoding else "rendering"
        return (
            f"out of memory {what} {size} images at {settings.width}x{settings.height} on {self.device} "
            f"(batch size {self.batch_size}; not split: `tune` probes which batch sizes fit)"
        )

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def host_bytes(self, size: int) -> torch.Tensor:
        """An uninitialised host buffer of `size` bytes for pixels, page-locked on CUDA with
        `pinned_copy` so that the copy from the GPU is one asynchronous DMA. torch caches
        page-locked blocks, so a buffer per call does not pay cudaHostAlloc each time."""
        import torch

        pinned = self.device == "cuda" and self.model.pinned_copy
        return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)

    def host_pixels(self, rows: int, settings: RenderSettings) -> torch.Tensor:
        """`host_bytes` for `rows` images, as (rows, height, width, 3)."""
        shape = (rows, settings.height, settings.width, 3)
        return self.host_bytes(rows * settings.height * settings.width * 3).view(shape)

    def generate(
        self,
        prompts: list[str],
        negative_prompts: list[str | None],
        seeds: list[int],
        settings: RenderSettings,
        out: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Render one model call; returns uint8 pixels of shape (N, height, width, 3).

        `out`: a host uint8 tensor of that shape to write the pixels into (`host_pixels`; the
        stage hands in a slice of the batch's one buffer, so that the pixels are copied once, from
        the device into it); default: a new one.

        Runs diffusers' SDXL pipeline in timed phases (text encoding, denoising, VAE decoding,
        the copy to the host) with the same arithmetic as one `pipe(...)` call; the seconds of each
        phase are added to `stage_seconds`. On CUDA the phases are timed with events and the call
        synchronizes once, at its end, when its pixels are on the host.
        """
        import torch

        if self.pipe is None:
            raise RuntimeError("ImageGenerator.generate() called before load()")
        rows = len(prompts)
        if out is None:
            out = self.host_pixels(rows, settings)
        prompts, negative_prompts, seeds = self._padded(prompts, negative_prompts, seeds)
        pipe = self.pipe
        timer = self._timer = StageTimer(self.device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        negatives = [n or "" for n in negative_prompts] if settings.negative else None
        # The full LCM UNet takes guidance as an embedding, not as classifier-free guidance.
        cfg = settings.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        with torch.inference_mode():
            with timer("text_encode"):
                embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=prompts,
                    device=torch.device(self.device),
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=negatives,
                )
            with timer("denoise"), attention_kernels(self.model.attention):
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
                pixels = self._decode(latents[:rows], settings)  # padding rows are never decoded
            with timer("to_host"):
                out.copy_(pixels, non_blocking=out.is_pinned())
        self._timer = None
        phases = timer.finish()
        self.unet_seconds += phases.pop("unet", 0.0)
        for stage, seconds in phases.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        result: np.ndarray = out.numpy()
        return result

    def _padded(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int]
    ) -> tuple[list[str], list[str | None], list[int]]:
        """With `compile`, a call is padded with copies of its first row to the next power of two
        (or the actor's largest batch). torch.compile specialises the UNet on its input shapes:
        every other batch size (a settings group's tail, a resume gap, the last batch, an
        out-of-memory split) would compile again, idling the GPU for minutes each time, and past
        torch's recompile limit the UNet silently runs uncompiled. Powers of two bound the shapes
        at log2(batch) + 1 per settings group and waste under half a call, where padding every
        call to the largest batch made a 1-row tail cost a whole batch. Each row draws its noise
        from its own generator, so padding does not change the real rows' images."""
        largest = self.max_batch or self.batch_size or len(prompts)
        target = min(largest, padded_size(len(prompts)))
        missing = target - len(prompts)
        if not self.model.compile or missing <= 0:
            return prompts, negative_prompts, seeds
        return (
            prompts + prompts[:1] * missing,
            negative_prompts + negative_prompts[:1] * missing,
            seeds + seeds[:1] * missing,
        )

    def decode_chunk(self, settings: RenderSettings) -> int:
        """Images the VAE decodes in one call at this size: `vae_batch_size`, else about
        DECODE_PIXELS; lowered by out-of-memory errors while decoding (`max_decode_pixels`)."""
        pixels = settings.width * settings.height
        chunk = self.model.vae_batch_size or max(1, DECODE_PIXELS // pixels)
        if self.max_decode_pixels is not None:
            chunk = min(chunk, max(1, self.max_decode_pixels // pixels))
        return chunk

    def _decode(self, latents: torch.Tensor, settings: RenderSettings) -> torch.Tensor:
        """Latents → uint8 pixels (N, height, width, 3) on the device, in chunks (`decode_chunk`).

        Decoding is the peak-memory phase at 1024². An out-of-memory error here halves the chunk
        and decodes again, without denoising again; only a single image that does not decode goes
        back to `render`, which splits the whole call."""
        import torch

        parts: list[torch.Tensor] = []
        start = 0
        while start < len(latents):
            size = min(self.decode_chunk(settings), len(latents) - start)
            try:
                parts.append(to_uint8(decode_latents(self.pipe, latents[start : start + size])))
            except Exception as error:
                if size == 1 or not is_out_of_memory(error):
                    raise
            else:
                start += size
                continue
            self._free_memory()  # after the except block, as in `render`
            if not self.split_on_oom:
                raise ModelError(self._out_of_memory(size, settings, decoding=True))
            self.oom_retries += 1
            self.max_decode_pixels = size // 2 * settings.width * settings.height
            logger.warning(
                "out of memory decoding %d images at %dx%d: decoding in chunks of %d",
                size,
                settings.width,
                settings.height,
                self.decode_chunk(settings),
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

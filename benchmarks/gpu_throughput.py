"""GPU throughput of the generator: the full SDXL architecture with random weights (no downloads).

    .venv/bin/python benchmarks/gpu_throughput.py                        # on a CUDA machine: everything
    .venv/bin/python benchmarks/gpu_throughput.py --size tiny            # CPU smoke test (CI runs it)

Random weights have the real cost: every matmul and convolution of SDXL's UNet (2.6 B parameters),
VAE decoder and both text encoders runs at full size; only the images are noise. The architecture's
config values are public facts (stabilityai/stable-diffusion-xl-base-1.0's configs).

Measures `ImageGenerator.generate` (text encoding, denoising, VAE decoding, uint8 copy to the host:
the model loop of one actor) after warm-up calls, for each preset and batch size, with the speed
switches on (the defaults), then with each switch off on its own (ablation). Prints images/s, ms
per image, peak memory and the achieved TFLOP/s against the FLOP counts of issue 8: one UNet pass at
1024² ≈ 6.8 TFLOP per image (x2 with classifier-free guidance), the VAE decoder ≈ 10.5 TFLOP,
both scaling with the pixel count. Writes a markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models.generator import ImageGenerator, RenderSettings  # noqa: E402
from pipeline.models.presets import get_preset  # noqa: E402

UNET_TFLOP_1024 = 6.8  # per image, one UNet pass at 1024x1024
VAE_TFLOP_1024 = 10.5  # per image, VAE decoder at 1024x1024
PEAK_TFLOPS = 790.0  # dense bf16 matmul an H100/H200 sustains
# (preset, size): issue 8's list.
FULL_PRESETS = [
    ("lightning-1step", 1024), ("lightning-2step", 1024), ("lightning-4step", 1024), ("lightning-8step", 1024),
    ("turbo", 512), ("sdxl-base", 1024),
]  # fmt: skip
SWITCHES = ("channels_last", "fuse_qkv", "pinned_copy", "attention", "dtype")
PROMPT = "a photo of an astronaut riding a horse on the moon, cinematic lighting, highly detailed"


def sdxl_components(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """SDXL base 1.0's architecture with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipeline.models.tiny import _train_tokenizer

    vocab, merges = _train_tokenizer()  # a small BPE vocab: token ids fall inside CLIP's 49,408
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    special: dict[str, Any] = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]}
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025,
            # SDXL's VAE must decode in float32 when the model is float16; the fp16-fix VAE does not.
            force_upcast=dtype != torch.float16,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
                projection_dim=768,
                **special,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
                **special,
            )
        )
    modules: list[Any] = [unet, vae, text_encoder, text_encoder_2]
    for module in modules:
        module.to(dtype)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return {
        "unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer,
    }  # fmt: skip


def make_generator(size: str, preset: str, switches: dict[str, Any], cache: dict[str, Any]) -> ImageGenerator:
    """A generator for `preset` holding the benchmark's pipeline (built once per dtype)."""
    from diffusers import StableDiffusionXLPipeline

    device: Literal["cuda", "cpu"] = "cuda" if torch.cuda.is_available() else "cpu"
    if size == "tiny":
        generator = ImageGenerator(ModelConfig(preset="tiny", device=device, cache_dir=cache["tiny_root"], **switches))
        generator.load()
        return generator
    generator = ImageGenerator(ModelConfig(preset=preset, device=device, **switches))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[switches["dtype"]]
    key = f"components-{dtype}"
    if key not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        cache[key] = sdxl_components(device, dtype)
    generator.device, generator.dtype = device, dtype
    # A fresh pipeline object over the same modules; fusing and layout switches are undone below.
    generator.adopt(StableDiffusionXLPipeline(**cache[key]))
    return generator


def release(generator: ImageGenerator) -> None:
    """Undo the in-place switches on the shared modules for the next configuration."""
    pipe = generator.pipe
    if "fuse_qkv" in generator.techniques:
        pipe.unfuse_qkv_projections()
    if "channels_last" in generator.techniques:
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.vae.to(memory_format=torch.contiguous_format)
    if generator.model.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())


def tflop_per_image(steps: int, cfg: bool, pixels: int) -> float:
    scale = pixels / 1024**2
    return (steps * UNET_TFLOP_1024 * (2 if cfg else 1) + VAE_TFLOP_1024) * scale


@dataclass
class Result:
    label: str
    preset: str
    size: int
    batch: int
    images_per_second: float
    ms_per_image: float
    peak_gb: float
    tflop_per_image: float
    stages: dict[str, float]

    @property
    def tflops(self) -> float:
        return self.images_per_second * self.tflop_per_image


def measure(generator: ImageGenerator, preset_name: str, size: int, batch: int, *, warmup: int, iters: int) -> Result:
    preset = get_preset(preset_name)
    cfg = preset.guidance_scale > 1.0
    settings = RenderSettings(
        width=size, height=size, steps=preset.steps, guidance_scale=preset.guidance_scale, negative=cfg
    )
    prompts = [f"{PROMPT}, {i}" for i in range(batch)]
    negatives: list[str | None] = ["blurry"] * batch if cfg else [None] * batch
    for i in range(warmup):
        generator.generate(prompts, negatives, list(range(i * batch, (i + 1) * batch)), settings)
    if generator.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    generator.stage_seconds.clear()
    start = time.perf_counter()
    for i in range(iters):
        generator.generate(prompts, negatives, list(range(i * batch, (i + 1) * batch)), settings)
    elapsed = time.perf_counter() - start
    images = batch * iters
    peak = (
        torch.cuda.max_memory_allocated() / 2**30 if generator.device == "cuda" else generator.peak_memory_mb() / 1024
    )
    return Result(
        label="", preset=preset_name, size=size, batch=batch, images_per_second=images / elapsed,
        ms_per_image=1000 * elapsed / images, peak_gb=peak,
        tflop_per_image=tflop_per_image(preset.steps, cfg, size * size),
        stages={k: 1000 * v / images for k, v in generator.stage_seconds.items()},
    )  # fmt: skip


def defaults(size: str) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    dtype = "float32" if size == "tiny" and not on_gpu else "bfloat16"
    return {"dtype": dtype, "attention": "sdpa", "channels_last": True, "fuse_qkv": True, "pinned_copy": True}


def ablations(base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every switch off on its own (and the alternatives of attention and precision)."""
    runs = [("all switches on (defaults)", base)]
    runs += [(f"{name} off", {**base, name: False}) for name in ("channels_last", "fuse_qkv", "pinned_copy")]
    runs += [("attention eager", {**base, "attention": "eager"}), ("attention flash", {**base, "attention": "flash"})]
    if base["dtype"] == "bfloat16":
        runs.append(("float16 (VAE without float32 upcast, as the fp16-fix VAE)", {**base, "dtype": "float16"}))
    return runs


def table(results: list[Result], *, on_gpu: bool, full: bool = True) -> str:
    """Markdown rows; FLOP figures only for the full-size architecture (the counts are SDXL's)."""
    lines = [
        "| run | preset | size | batch | images/s | ms/image | peak GiB | TFLOP/image | TFLOP/s | % of 790 |"
        " text / denoise / vae / host ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        stages = " / ".join(f"{r.stages.get(k, 0.0):.1f}" for k in ("text_encode", "denoise", "vae_decode", "to_host"))
        share = f"{100 * r.tflops / PEAK_TFLOPS:.1f}" if on_gpu and full else "-"
        flop, rate = (f"{r.tflop_per_image:.1f}", f"{r.tflops:.1f}") if full else ("-", "-")
        lines.append(
            f"| {r.label} | {r.preset} | {r.size} | {r.batch} | {r.images_per_second:.2f} | {r.ms_per_image:.1f} | "
            f"{r.peak_gb:.1f} | {flop} | {rate} | {share} | {stages} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: issue 8's list)")
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--ablation-preset", default="lightning-4step")
    parser.add_argument("--ablation-batch", type=int, default=8)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--out", default=None, help="markdown file (default: benchmarks/results/gpu_throughput-<device>.md)"
    )
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    cache: dict[str, Any] = {}
    tiny_context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if args.size == "tiny":
        import tempfile

        from pipeline.models.tiny import TINY_VERSION, build_tiny_pipeline
        from pipeline.models.weights import materialize

        tiny_context = tempfile.TemporaryDirectory()
        folder = tiny_context.__enter__()
        materialize(Path(folder), f"tiny-v{TINY_VERSION}", build_tiny_pipeline)
        cache["tiny_root"] = folder
    presets = (
        [(p.strip(), 1024 if args.size == "full" else 64) for p in args.presets.split(",")]
        if args.presets
        else (FULL_PRESETS if args.size == "full" else [("lightning-4step", 64)])
    )
    if args.size == "full":
        presets = [(name, get_preset(name).width if size == 1024 else size) for name, size in presets]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    base = defaults(args.size)
    results: list[Result] = []
    print(f"device: {device_name}; size: {args.size}; switches: {base}", flush=True)
    for preset, size in presets:
        generator = make_generator(args.size, preset, base, cache)
        for batch in batches:
            result = measure(generator, preset, size, batch, warmup=args.warmup, iters=args.iters)
            result.label = "defaults"
            results.append(result)
            print(table([result], on_gpu=on_gpu, full=args.size == "full").splitlines()[-1], flush=True)
        if args.size == "full":
            release(generator)
    if not args.no_ablation:
        preset = args.ablation_preset
        size = get_preset(preset).width if args.size == "full" else 64
        for label, switches in ablations(base):
            generator = make_generator(args.size, preset, switches, cache)
            result = measure(generator, preset, size, args.ablation_batch, warmup=args.warmup, iters=args.iters)
            result.label = label
            results.append(result)
            print(table([result], on_gpu=on_gpu, full=args.size == "full").splitlines()[-1], flush=True)
            if args.size == "full":
                release(generator)
    tiny_context.__exit__(None, None, None)
    text = "\n".join([
        f"# Generator throughput: {device_name}", "",
        f"`benchmarks/gpu_throughput.py --size {args.size}` ({time.strftime('%Y-%m-%d')}; torch {torch.__version__}). "
        f"Model loop of one actor after {args.warmup} warm-up calls, {args.iters} timed calls per row; "
        "TFLOP/image from issue 8's counts (UNet 6.8 per pass at 1024², x2 with CFG; VAE 10.5), scaled by pixels.",
        "", table(results, on_gpu=on_gpu, full=args.size == "full"), "",
    ])  # fmt: skip
    print("\n" + text)
    slug = "cpu-tiny" if not on_gpu else device_name.lower().replace(" ", "-")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_throughput-{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

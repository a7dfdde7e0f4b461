"""The GPU check: one actor's whole model path on the full SDXL architecture with random weights.

    PYTHONPATH=. python3 benchmarks/gpu_throughput.py --quick --results-dir OUT    # CUDA: < 6 min on an H100
    PYTHONPATH=. python3 benchmarks/gpu_throughput.py                              # CUDA: every preset and batch
    PYTHONPATH=. python3 benchmarks/gpu_throughput.py --size tiny --quick          # CPU smoke test (in the suite)

It builds SDXL base 1.0's architecture with random weights (the config values are public facts of
stabilityai/stable-diffusion-xl-base-1.0; no download), saves it as a diffusers folder plus a
single-file Lightning UNet (float16 safetensors, as ByteDance publishes it), and then, per row,
does what a generator actor does: `ImageGenerator.load()` from those files (time to load, time to
the first image), then steady model calls (`generate`: text encoding, denoising, VAE decoding,
the copy to the host) after warm-up. Random weights have the real cost: every matmul and
convolution runs at full size; only the images are noise.

Rows: presets x batch sizes with the default switches, then the ablation: each switch off (or
changed) on its own, on Lightning 4-step 1024² at batch 8. Each row is appended to the markdown
table in `--results-dir` as soon as it is measured, so a crash keeps what was measured; a row
that fails records its error and the run goes on. On a CUDA machine the full size is the
default, and nothing falls back to the tiny model.

Imports neither ray nor s3fs: a CUDA machine with torch, transformers, peft and safetensors
needs only diffusers and pydantic added (`../shared/gpu/README.md`).

Figures: images/s and ms/image over the timed calls; busy = the share of their wall time inside
the model call's phases (GPU-timeline spans from CUDA events, about 1 by construction: they cover
the whole call); work = the share inside the UNet's forward passes and the VAE's decode (events
around each pass: it falls when the GPU waits between steps); idle ms/call = denoising less the
UNet's passes; syncs/call = host-device synchronisations in one more call (torch's sync debug
mode, CUDA only); util = NVML's GPU utilisation averaged over them; TFLOP/s against issue 8's counts (one
UNet pass at 1024² ≈ 6.8 TFLOP per image, x2 with classifier-free guidance; VAE decoder ≈ 10.5;
both scale with the pixel count).
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config import ModelConfig  # noqa: E402
from pipeline.core.render import RenderSettings  # noqa: E402
from pipeline.models.generator import ImageGenerator  # noqa: E402
from pipeline.models.presets import get_preset  # noqa: E402
from pipeline.run.telemetry import UtilizationSampler, nvml_reader  # noqa: E402

UNET_TFLOP_1024 = 6.8  # per image, one UNet pass at 1024x1024
VAE_TFLOP_1024 = 10.5  # per image, VAE decoder at 1024x1024
PEAK_TFLOPS = 790.0  # dense bf16 matmul an H100/H200 sustains
ASSUMED_TFLOPS = 300.0  # for the time estimate printed before starting
ASSUMED_LOAD_GBPS = 1.5  # reading and moving weights, for the same estimate
TARGET_IMAGES_PER_SECOND, TARGET_BUSY = 10.0, 0.95  # issue 13, Lightning 4-step 1024² bf16 on one H100
PROMPT = "a photo of an astronaut riding a horse on the moon, cinematic lighting, highly detailed"
LIGHTNING_UNET = "sdxl_lightning_4step_unet.safetensors"
LORA_RANK = {"tiny": 4, "full": 64}  # the published Lightning and LCM LoRAs are rank 64


@dataclass(frozen=True)
class Run:
    """One load of a generator, then timed rows for each batch size."""

    label: str
    preset: str
    batches: tuple[int, ...]
    switches: dict[str, Any] = field(default_factory=dict)
    iters: int | None = None  # default: --iters


@dataclass
class Row:
    label: str
    preset: str
    size: int
    batch: int
    load_s: float = 0.0
    first_image_s: float = 0.0  # from the start of load() to the end of the first call
    images_per_second: float = 0.0
    ms_per_image: float = 0.0
    peak_gb: float = 0.0
    busy: float = 0.0
    work: float = 0.0  # share of wall time in the UNet's passes and the VAE's decode
    idle_ms: float = 0.0  # per call: denoising less the UNet's passes (the device waiting between steps)
    syncs: float | None = None  # host-device synchronisations per call (CUDA: torch's sync debug mode)
    utilization: float | None = None
    tflop_per_image: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def tflops(self) -> float:
        return self.images_per_second * self.tflop_per_image


# --- the model on disk ----------------------------------------------------------------------


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
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **special,
            )
        )  # fmt: skip
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **special,
            )
        )  # fmt: skip
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


@dataclass(frozen=True)
class SavedModel:
    """What the rows load: a diffusers folder, a single-file UNet, and the float16 runs' VAE."""

    folder: Path
    unet_file: Path
    fp16_vae: Path
    lora_file: Path  # a random LoRA for the base, in kohya's layout (as SDXL-Lightning publishes its LoRAs)
    gigabytes: float


def save_model(root: Path, size: str, device: str) -> SavedModel:
    """The random-weight model on disk, as an actor finds a real one (bfloat16 folder; float16
    Lightning file; the float16 runs use a VAE with force_upcast off, as the fp16-fix VAE)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    if size == "tiny":
        from pipeline.models.tiny import build_tiny_pipeline

        folder = build_tiny_pipeline(root / "sdxl")
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    else:
        pipe = StableDiffusionXLPipeline(**sdxl_components(device, torch.bfloat16))
        pipe.save_pretrained(str(root / "sdxl"))  # type: ignore[attr-defined]
        folder = root / "sdxl"
    state = {name: tensor.to("cpu", torch.float16).contiguous() for name, tensor in pipe.unet.state_dict().items()}
    save_file(state, str(root / LIGHTNING_UNET))
    pipe.vae.register_to_config(force_upcast=False)
    pipe.vae.save_pretrained(str(root / "vae-fp16-fix"))
    del pipe, state
    free_memory()
    from pipeline.models.tiny import save_tiny_lora

    lora = save_tiny_lora(folder, root, "lora.safetensors", seed=3, rank=LORA_RANK[size], layout="kohya")
    gigabytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e9
    return SavedModel(
        folder=folder, unet_file=root / LIGHTNING_UNET, fp16_vae=root / "vae-fp16-fix", lora_file=lora,
        gigabytes=gigabytes,
    )  # fmt: skip


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the rows -------------------------------------------------------------------------------


def defaults(device: str) -> dict[str, Any]:
    return {"dtype": "bfloat16" if device == "cuda" else "float32", "attention": "sdpa"}


def ablations(base: dict[str, Any], *, compile_too: bool) -> list[Run]:
    """Each switch off (or changed) on its own, on Lightning 4-step at batch 8."""
    changes: list[tuple[str, dict[str, Any]]] = [
        ("all switches on (defaults)", {}),
        *((f"{name} off", {name: False}) for name in ("channels_last", "vae_channels_last", "fuse_qkv", "pinned_copy")),
        ("attention eager", {"attention": "eager"}),
        ("attention flash", {"attention": "flash"}),
        ("VAE undivided (vae_batch_size 8)", {"vae_batch_size": 8}),
    ]
    if base["dtype"] == "bfloat16":
        changes.append(("float16 (fp16-fix VAE)", {"dtype": "float16"}))
    if compile_too:
        changes.append(("compile", {"compile": True}))
    return [Run(label, "lightning-4step", (8,), {**base, **change}) for label, change in changes]


def plan(args: argparse.Namespace, device: str) -> list[Run]:
    base = defaults(device)
    if args.presets or args.batch_sizes:
        presets = (args.presets or "lightning-4step").split(",")
        batches = tuple(int(b) for b in (args.batch_sizes or "1,4,8,16").split(","))
        runs = [Run("defaults", preset, batches, base) for preset in presets]
    elif args.quick:
        runs = [
            Run("defaults", "lightning-4step", (4, 8), base),
            Run("defaults", "turbo", (8,), base),
            Run("defaults", "sdxl-base", (4,), base, iters=2),
            Run("LoRA loaded and fused (kohya layout)", "lightning-lora-4step", (8,), base),
        ]
    else:
        presets = ["lightning-1step", "lightning-2step", "lightning-4step", "lightning-8step", "turbo", "sdxl-base"]
        runs = [Run("defaults", preset, (1, 4, 8, 16), base) for preset in presets]
    if not args.no_ablation:
        runs += ablations(base, compile_too=not args.quick)
    return runs


def image_size(preset: str, size: str) -> int:
    return get_preset(preset).width if size == "full" else get_preset(preset).width // 16


def tflop_per_image(preset: str, pixels: int) -> float:
    settings = get_preset(preset)
    passes = settings.steps * (2 if settings.guidance_scale > 1.0 else 1)
    return (passes * UNET_TFLOP_1024 + VAE_TFLOP_1024) * pixels / 1024**2


def estimate_seconds(runs: list[Run], args: argparse.Namespace, model_gb: float) -> float:
    """Time the plan takes at ASSUMED_TFLOPS and ASSUMED_LOAD_GBPS (full size only)."""
    seconds = 2 * model_gb / ASSUMED_LOAD_GBPS  # build and save
    for run in runs:
        seconds += model_gb / ASSUMED_LOAD_GBPS
        calls = args.warmup + (run.iters or args.iters)
        per_image = tflop_per_image(run.preset, image_size(run.preset, "full") ** 2)
        flop = sum(calls * batch * per_image for batch in run.batches)
        seconds += flop / ASSUMED_TFLOPS * (3 if run.switches.get("attention") == "eager" else 1)
        seconds += 180 if run.switches.get("compile") else 0
    return seconds


def model_config(run: Run, model: SavedModel, device: str, cache: Path) -> ModelConfig:
    preset = get_preset(run.preset)
    switches = dict(run.switches)
    if switches.get("dtype") == "float16":
        switches["vae"] = str(model.fp16_vae)
    return ModelConfig(
        preset=run.preset,
        path=str(model.folder),
        unet=str(model.unet_file) if preset.unet else None,
        lora=str(model.lora_file) if preset.lora else None,
        device=device,  # type: ignore[arg-type]
        fp16_fix_vae=False,
        cache_dir=str(cache),
        **switches,
    )


def measure_run(run: Run, model: SavedModel, args: argparse.Namespace, device: str, cache: Path) -> Iterator[Row]:
    """Load a generator as an actor does, then time each batch size; the first call after load
    gives the time to the first image. A failure is recorded in its row (all rows if the load
    failed) and the next row still runs."""
    side = image_size(run.preset, args.size)
    rows = [Row(run.label, run.preset, side, batch) for batch in run.batches]
    started = time.perf_counter()
    try:
        generator = ImageGenerator(model_config(run, model, device, cache), batch_size=max(run.batches))
        generator.load()
    except Exception as error:
        for row in rows:
            row.error = describe(error)
        free_memory()
        yield from rows
        return
    rows[0].load_s = time.perf_counter() - started
    preset = get_preset(run.preset)
    cfg = preset.guidance_scale > 1.0
    settings = RenderSettings(side, side, preset.steps, preset.guidance_scale, negative=cfg)
    read = nvml_reader() if device == "cuda" else None
    sampler = UtilizationSampler(read, interval=0.1) if read else None
    try:
        for i, row in enumerate(rows):
            prompts = [f"{PROMPT}, {j}" for j in range(row.batch)]
            negatives: list[str | None] = ["blurry"] * row.batch if cfg else [None] * row.batch
            try:
                for call in range(args.warmup):
                    seeds = list(range(call * row.batch, (call + 1) * row.batch))
                    generator.generate(prompts, negatives, seeds, settings)
                    if i == 0 and call == 0:
                        row.first_image_s = time.perf_counter() - started
                timed(generator, row, prompts, negatives, settings, run.iters or args.iters, sampler)
            except Exception as error:
                row.error = describe(error)
                free_memory()
            yield row
    finally:
        if sampler:
            sampler.stop()
        del generator
        free_memory()


def describe(error: BaseException) -> str:
    """An error on one table line."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:240].replace("|", "/")


def timed(
    generator: ImageGenerator,
    row: Row,
    prompts: list[str],
    negatives: list[str | None],
    settings: RenderSettings,
    iters: int,
    sampler: UtilizationSampler | None,
) -> None:
    if generator.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    generator.stage_seconds.clear()
    generator.unet_seconds = 0.0
    since, start = time.time(), time.perf_counter()
    for i in range(iters):  # each call into a new (page-locked on CUDA) host buffer, as the stage's
        generator.generate(prompts, negatives, list(range(i * row.batch, (i + 1) * row.batch)), settings)
    elapsed = time.perf_counter() - start
    images = row.batch * iters
    row.images_per_second, row.ms_per_image = images / elapsed, 1000 * elapsed / images
    row.busy = sum(generator.stage_seconds.values()) / elapsed
    row.work = (generator.unet_seconds + generator.stage_seconds.get("vae_decode", 0.0)) / elapsed
    row.idle_ms = 1000 * (generator.stage_seconds.get("denoise", 0.0) - generator.unet_seconds) / iters
    row.syncs = count_syncs(generator, prompts, negatives, settings, row.batch)
    row.utilization = sampler.mean_since(since) if sampler else None
    row.peak_gb = (
        torch.cuda.max_memory_allocated() / 2**30 if generator.device == "cuda" else generator.peak_memory_mb() / 1024
    )
    row.tflop_per_image = tflop_per_image(row.preset, settings.width * settings.height)
    row.stages = {k: 1000 * v / images for k, v in generator.stage_seconds.items()}


def count_syncs(
    generator: ImageGenerator, prompts: list[str], negatives: list[str | None], settings: RenderSettings, batch: int
) -> float | None:
    """Host-device synchronisations in one more call (CUDA only): torch warns at each one in its
    sync debug mode. The docs' "one synchronize per call" is the aim; copies from pageable memory
    and schedulers that add noise each step synchronise too."""
    if generator.device != "cuda":
        return None
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generator.generate(prompts, negatives, list(range(batch)), settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return float(sum("synchroniz" in str(w.message) for w in caught))


# --- the table --------------------------------------------------------------------------------

HEADER = (
    "| run | preset | size | batch | load s | first image s | images/s | ms/image | busy | work | idle ms/call "
    "| syncs/call | util % | peak GiB | TFLOP/s | % of 790 | text / denoise / vae / host ms |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def table_row(row: Row, *, full: bool) -> str:
    if row.error:
        return f"| {row.label} | {row.preset} | {row.size} | {row.batch} | error: {row.error} |" + " |" * 12
    stages = " / ".join(f"{row.stages.get(k, 0.0):.1f}" for k in ("text_encode", "denoise", "vae_decode", "to_host"))
    load = f"{row.load_s:.1f}" if row.load_s else ""
    first = f"{row.first_image_s:.1f}" if row.first_image_s else ""
    util = f"{row.utilization:.0f}" if row.utilization is not None else "-"
    syncs = f"{row.syncs:.0f}" if row.syncs is not None else "-"
    rate, share = (f"{row.tflops:.0f}", f"{100 * row.tflops / PEAK_TFLOPS:.1f}") if full else ("-", "-")
    return (
        f"| {row.label} | {row.preset} | {row.size} | {row.batch} | {load} | {first} | {row.images_per_second:.2f} | "
        f"{row.ms_per_image:.1f} | {row.busy:.3f} | {row.work:.3f} | {row.idle_ms:.1f} | {syncs} | {util} | "
        f"{row.peak_gb:.1f} | {rate} | {share} | {stages} |"
    )


def verdict(rows: list[Row]) -> str:
    """Issue 13's target, for the full-size Lightning 4-step rows in bfloat16."""
    candidates = [
        r for r in rows if r.preset == "lightning-4step" and r.label == "defaults" and not r.error and r.size == 1024
    ]
    if not candidates:
        return "target (>= 10 images/s, work >= 0.95, Lightning 4-step 1024² bf16): not measured in this run"
    best = max(candidates, key=lambda r: r.images_per_second)
    met = best.images_per_second >= TARGET_IMAGES_PER_SECOND and best.work >= TARGET_BUSY
    return (
        f"target (>= {TARGET_IMAGES_PER_SECOND:g} images/s, work >= {TARGET_BUSY}, Lightning 4-step 1024² bf16): "
        f"{'met' if met else 'NOT met'}: {best.images_per_second:.2f} images/s, work {best.work:.3f} "
        f"(busy {best.busy:.3f}) at batch {best.batch}"
    )


def write_results(path: Path, rows: list[Row], header: str, *, full: bool, done: bool) -> None:
    lines = [header, "", HEADER, *(table_row(r, full=full) for r in rows), ""]
    lines.append(verdict(rows) if done else f"(in progress: {len(rows)} rows so far)")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--size", choices=("full", "tiny"), default="full" if on_gpu else "tiny")
    parser.add_argument("--quick", action="store_true", help="the short check (< 6 min on one H100)")
    parser.add_argument("--presets", default=None, help="comma-separated presets instead of the plan's")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes instead of the plan's")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=None, help="where the model is saved (default: a temporary folder)")
    args = parser.parse_args()

    device = "cuda" if on_gpu else "cpu"
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    slug = name.lower().replace(" ", "-") if on_gpu else "cpu"
    if args.size == "tiny":
        slug += "-tiny"
    results = Path(args.results_dir) / f"gpu_throughput-{slug}.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    runs = plan(args, device)
    command = "benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:])
    header = "\n".join([
        f"# Generator throughput: {name}", "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {args.size} size). Each run loads "
        f"an actor's generator from a saved random-weight model, then times {args.warmup} warm-up and "
        f"{args.iters} calls per row (busy: share of the timed wall time inside the call's phases; work: inside the "
        "UNet's passes and the VAE's decode; util: NVML).",
    ])  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        root = Path(work)
        if args.size == "full":
            gigabytes = 7.0  # SDXL in bfloat16, for the estimate before anything is built
            minutes = estimate_seconds(runs, args, gigabytes) / 60
            print(
                f"estimated time (at {ASSUMED_TFLOPS:g} TFLOP/s, {ASSUMED_LOAD_GBPS:g} GB/s loads): "
                f"{minutes:.1f} min for {len(runs)} loads",
                flush=True,
            )
        start = time.perf_counter()
        model = save_model(root, args.size, device)
        saved = time.perf_counter() - start
        print(f"device: {name}; model saved ({model.gigabytes:.1f} GB) in {saved:.1f} s", flush=True)
        rows: list[Row] = []
        for run in runs:
            for row in measure_run(run, model, args, device, root / "cache"):
                rows.append(row)
                print(table_row(row, full=args.size == "full"), flush=True)
                write_results(results, rows, header, full=args.size == "full", done=False)
    write_results(results, rows, header, full=args.size == "full", done=True)
    print("\n" + results.read_text())
    print(f"written: {results} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

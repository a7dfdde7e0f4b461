"""The CUDA path's failure modes (issue 13), proven on CPU by construction or injection: flash
attention's kernel limits, the float32 VAE of a float16 model, one compiled shape, chunked
decoding that survives out-of-memory errors, fused projections without their originals, memory
released after an out-of-memory error, diffusers' own pixel arithmetic, one synchronize per call."""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.render import RenderSettings
from pipeline.models.decoding import DECODE_PIXELS
from pipeline.models.generator import ImageGenerator
from pipeline.models.techniques import fuse_qkv
from pipeline.models.timing import StageTimer
from pipeline.models.tiny import tiny_vae

PROMPTS = ["a fish made out of dendrobium flowers", "3d isometric dungeon game", "a red car", "a dog at night"]
SEEDS = [501798843, 3812179903, 55986344589, 7]
SMALL = RenderSettings(width=64, height=64, steps=2, guidance_scale=0.0)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _generator(model_cache: Path, **model: Any) -> ImageGenerator:
    """On the CPU unless `device` says otherwise: the checks here are the CPU's, and a CUDA
    machine's default device would change what they compare."""
    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), **{"device": "cpu", **model}))
    generator.load()
    return generator


def _oom(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what}; injected by the test)")


# --- 1. flash attention only where the kernel supports the call --------------------------------


@pytest.fixture(scope="module")
def wide_vae_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a VAE whose mid-block attention is one head of 512, as SDXL's."""
    folder = tmp_path_factory.mktemp("wide-vae") / "pipeline"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "vae")
    tiny_vae((32, 32, 64, 512)).save_pretrained(str(folder / "vae"))  # the mid block: one head of 512
    return folder


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every call of scaled_dot_product_attention, with the backends allowed at that moment."""
    calls: list[dict[str, Any]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        backends = torch.backends.cuda
        others = backends.math_sdp_enabled() or backends.mem_efficient_sdp_enabled() or backends.cudnn_sdp_enabled()
        calls.append({
            "head_dim": query.shape[-1],
            "dtype": query.dtype,
            "mask": kwargs.get("attn_mask", args[0] if args else None) is not None,
            "flash_only": backends.flash_sdp_enabled() and not others,
        })  # fmt: skip
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    yield calls


def test_flash_attention_only_where_the_kernel_takes_the_call(
    wide_vae_dir: Path, model_cache: Path, sdpa_calls: list[dict[str, Any]]
) -> None:
    # PyTorch's flash kernel on CUDA: float16/bfloat16, head width a multiple of 8 up to 256, no
    # arbitrary mask. (The CPU build has a flash kernel without these limits, so the calls are
    # checked against CUDA's limits rather than left to fail.)
    generator = _generator(model_cache, path=str(wide_vae_dir), attention="flash", dtype="bfloat16")
    generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL)
    flash = [call for call in sdpa_calls if call["flash_only"]]
    assert flash, "attention: flash restricted no call"
    for call in flash:
        assert call["head_dim"] <= 256 and call["head_dim"] % 8 == 0, call
        assert call["dtype"] in (torch.float16, torch.bfloat16) and not call["mask"], call
    assert any(call["head_dim"] == 512 for call in sdpa_calls), "the VAE's 512-wide attention did not run"
    assert len(flash) < len(sdpa_calls)  # the VAE and text encoders chose their own kernels


def test_flash_attention_needs_a_16_bit_dtype(model_cache: Path) -> None:
    with pytest.raises(ConfigError, match="flash needs a 16-bit dtype"):
        from pipeline.core.config import build_config

        build_config({"manifest": "m", "output": "o", "model": {"attention": "flash", "dtype": "float32"}})
    with pytest.raises(ModelError, match=r"resolved to torch\.float32 on cpu"):
        _generator(model_cache, attention="flash")  # dtype auto is float32 on CPU


@pytest.mark.gpu
def test_flash_attention_takes_the_auto_dtype_on_cuda(model_cache: Path) -> None:
    """Where the CPU refuses it, CUDA's `dtype: auto` is 16-bit: flash loads as asked."""
    generator = _generator(model_cache, device="cuda", attention="flash")
    assert generator.dtype in (torch.bfloat16, torch.float16) and "attention=flash" in generator.techniques


# --- 2. the float16 model's VAE is float32 from load ---------------------------------------------


def test_fp16_vae_is_float32_from_load_and_survives_an_oom_while_decoding(
    model_cache: Path, recwarn: pytest.WarningsRecorder
) -> None:
    generator = _generator(model_cache, dtype="float16", fp16_fix_vae=False)
    vae = generator.pipe.vae
    assert vae.config.force_upcast and vae.dtype == torch.float32 and generator.pipe.unet.dtype == torch.float16
    assert "vae=float32" in generator.techniques
    expected = generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL)

    decode = vae.decode
    failures = iter([True])

    def decode_once_out_of_memory(latents: torch.Tensor, **kwargs: Any) -> Any:
        if next(failures, False):
            raise _oom("VAE decode")
        return decode(latents, **kwargs)

    vae.decode = decode_once_out_of_memory
    try:
        images, _ = generator.render(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL)
    finally:
        del vae.decode
    assert generator.oom_retries == 1 and vae.dtype == torch.float32
    assert _max_diff(images, expected) <= 2
    assert not [w for w in recwarn if "upcast" in str(w.message)]  # no per-call cast, no deprecation


# --- 4. one compiled shape --------------------------------------------------------------------


def test_compiled_unet_runs_a_few_bucketed_shapes(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `compile`, a call runs at the next power of two of its rows (padded with copies of its
    first row), capped at the actor's batch: at most log2(batch) + 1 compiled shapes per settings
    group, each compiled once, and a 1-row tail costs one row, not a whole batch. The padding
    rows never change the real rows' images."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = ImageGenerator(
        ModelConfig(preset="tiny", cache_dir=str(model_cache), device="cpu", compile=True), batch_size=4
    )
    compiled.compile_backend = counter
    compiled.load()
    calls = _Counting(compiled.pipe, decode_limit=99, hold=[])
    monkeypatch.setattr(compiled, "pipe", calls)
    eager = _generator(model_cache)
    frames: list[int] = []
    for n in (4, 2, 3, 4, 1, 2, 3):
        prompts, seeds = PROMPTS[:n], SEEDS[:n]
        images, sizes = compiled.render(prompts, [None] * n, seeds, SMALL)
        assert images.shape == (n, 64, 64, 3) and sizes == [n] * n
        assert _max_diff(images, eager.generate(prompts, [None] * n, seeds, SMALL)) <= 2
        frames.append(counter.frame_count)
    assert calls.denoised == [4, 2, 4, 4, 1, 2, 4]  # the UNet's batch rows: 3 -> 4, never 1 -> 4
    new_shape = [True, True, False, False, True, False, False]  # 4, 2 and 1 compile once each
    grew = [b > a for a, b in zip([0, *frames], frames, strict=False)]
    assert grew == new_shape and frames[0] > 0


# --- 5 and 7. chunked decoding; out-of-memory errors release memory ----------------------------


class _Counting:
    """Stands in for the pipeline: counts denoising calls; its VAE can fail like a full GPU."""

    def __init__(self, pipe: Any, decode_limit: int, hold: list[Callable[[], Any]]):
        self.pipe, self.decode_limit, self.hold = pipe, decode_limit, hold
        self.denoised: list[int] = []
        self.decoded: list[int] = []
        decode = pipe.vae.decode

        def decode_within_limit(latents: torch.Tensor, **kwargs: Any) -> Any:
            self.decoded.append(len(latents))
            if len(latents) > self.decode_limit:
                activations = torch.empty(len(latents), 1024)  # what the failed call had allocated
                self.hold.append(weakref.ref(activations))
                raise _oom(f"decoding {len(latents)} images")
            return decode(latents, **kwargs)

        self.vae_decode = decode_within_limit

    def __call__(self, *, prompt_embeds: torch.Tensor, **kwargs: Any) -> Any:
        self.denoised.append(prompt_embeds.shape[0])
        return self.pipe(prompt_embeds=prompt_embeds, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def test_default_decode_chunk_follows_the_image_size(model_cache: Path) -> None:
    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache)))
    assert [generator.decode_chunk(RenderSettings(s, s, 4, 0.0)) for s in (1024, 768, 512, 2048)] == [4, 7, 16, 1]
    assert ImageGenerator(ModelConfig(vae_batch_size=2)).decode_chunk(RenderSettings(512, 512, 4, 0.0)) == 2


def test_oom_while_decoding_shrinks_the_chunk_without_denoising_again(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = _generator(model_cache)
    expected = generator.generate(PROMPTS, [None] * 4, SEEDS, SMALL)
    released: list[bool] = []
    held: list[Callable[[], Any]] = []
    free = generator._free_memory

    def free_and_check() -> None:
        free()
        released.append(all(ref() is None for ref in held))

    monkeypatch.setattr(generator, "_free_memory", free_and_check)
    fake = _Counting(generator.pipe, decode_limit=1, hold=held)
    monkeypatch.setattr(generator.pipe.vae, "decode", fake.vae_decode)
    monkeypatch.setattr(generator, "pipe", fake)
    images, sizes = generator.render(PROMPTS, [None] * 4, SEEDS, SMALL)
    assert fake.denoised == [4] and sizes == [4] * 4  # one denoising call for the four images
    assert fake.decoded == [4, 2, 1, 1, 1, 1]  # default chunk (all four at 64x64), then halved twice
    assert generator.oom_retries == 2 and generator.decode_chunk(SMALL) == 1 and generator.max_batch is None
    assert _max_diff(images, expected) <= 2
    assert released == [True, True]  # the failed calls' tensors were gone when memory was freed


def test_oom_in_a_model_call_releases_its_tensors_before_freeing_memory(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = _generator(model_cache)
    held: list[Callable[[], Any]] = []
    released: list[bool] = []
    real_pipe, free = generator.pipe, generator._free_memory

    def denoise_up_to_two(*, prompt_embeds: torch.Tensor, **kwargs: Any) -> Any:
        if prompt_embeds.shape[0] > 2:
            activations = torch.empty(prompt_embeds.shape[0], 1024)
            held.append(weakref.ref(activations))
            raise _oom("denoising")
        return real_pipe(prompt_embeds=prompt_embeds, **kwargs)

    class Pipe:
        __call__ = staticmethod(denoise_up_to_two)

        def __getattr__(self, name: str) -> Any:
            return getattr(real_pipe, name)

    def free_and_check() -> None:
        free()
        released.append(all(ref() is None for ref in held))

    monkeypatch.setattr(generator, "_free_memory", free_and_check)
    monkeypatch.setattr(generator, "pipe", Pipe())
    _, sizes = generator.render(PROMPTS, [None] * 4, SEEDS, SMALL)
    assert sizes == [2] * 4 and len(held) == 1 and released == [True]


# --- 6. fused projections without their originals -------------------------------------------


def _parameters(pipe: Any) -> int:
    return sum(p.numel() for model in (pipe.unet, pipe.vae) for p in model.parameters())


def test_fused_qkv_drops_the_separate_projections(model_cache: Path) -> None:
    from diffusers.models.attention_processor import Attention

    generator = _generator(model_cache)
    before = generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL)
    count = _parameters(generator.pipe)
    dropped = fuse_qkv(generator.pipe)
    assert dropped > 0 and _parameters(generator.pipe) == count  # fused weights replace, never add
    for model in (generator.pipe.unet, generator.pipe.vae):
        for module in model.modules():
            if isinstance(module, Attention):
                kept = {"to_q"} if module.is_cross_attention else set()
                assert {n for n in ("to_q", "to_k", "to_v") if hasattr(module, n)} == kept
    assert _max_diff(generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL), before) <= 2


# --- 8. diffusers' own pixels, bit for bit -------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pixels_equal_a_plain_diffusers_call_bit_for_bit(tiny_dir: Path, model_cache: Path, dtype: str) -> None:
    from diffusers import StableDiffusionXLPipeline

    ours = _generator(model_cache, dtype=dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir), dtype=getattr(torch, dtype))
    pipe.scheduler = ours.pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPTS[:2],
        num_inference_steps=2,
        guidance_scale=0.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS[:2]],
    ).images
    expected = np.stack([np.asarray(image) for image in images])
    assert np.array_equal(ours.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL), expected)


# --- 9. one synchronize per call on CUDA -------------------------------------------------------


def test_stage_timer_synchronizes_once_per_call_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's events stood in for: phases record events, and only the last one is waited for."""
    waited: list[int] = []

    class Event:
        recorded = 0

        def __init__(self, enable_timing: bool = False):
            self.at = 0.0

        def record(self) -> None:
            Event.recorded += 1
            self.at = Event.recorded * 0.5

        def synchronize(self) -> None:
            waited.append(Event.recorded)

        def elapsed_time(self, end: Event) -> float:
            return (end.at - self.at) * 1000  # milliseconds, as CUDA reports them

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a device-wide synchronize"))
    timer = StageTimer("cuda")
    for stage in ("text_encode", "denoise", "vae_decode", "to_host"):
        with timer(stage):
            pass
    assert waited == []  # nothing waits while the phases are queued
    assert timer.finish() == {"text_encode": 0.5, "denoise": 0.5, "vae_decode": 0.5, "to_host": 0.5}
    assert waited == [8]  # once, on the call's last event


def test_generate_writes_into_the_given_host_buffer(model_cache: Path) -> None:
    generator = _generator(model_cache)
    out = generator.host_pixels(2, SMALL)
    images = generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SMALL, out=out)
    assert images.ctypes.data == out.data_ptr() and images.shape == (2, 64, 64, 3)
    assert DECODE_PIXELS == 4 * 1024 * 1024

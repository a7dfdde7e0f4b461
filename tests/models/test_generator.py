"""The reproducibility contract and the real loading code, on tiny artifacts built here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ModelError
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator

PROMPTS = ["a fish made out of dendrobium flowers", "3d isometric dungeon game", "a red car", "a dog at night"]
SEEDS = [501798843, 3812179903, 55986344589, 7]
SETTINGS = RenderSettings(width=128, height=128, steps=4, guidance_scale=0.0)


@pytest.fixture(scope="module")
def tiny_generator(model_cache: Path) -> ImageGenerator:
    """On the CPU wherever this runs: the tests compare it with a plain diffusers pipeline on the
    CPU, and name the CPU's memory."""
    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), device="cpu"))
    generator.load()
    return generator


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_image_does_not_depend_on_batch_size(tiny_generator: ImageGenerator) -> None:
    batched = tiny_generator.generate(PROMPTS, [None] * 4, SEEDS, SETTINGS)
    assert batched.shape == (4, 128, 128, 3) and batched.dtype == np.uint8
    for i in range(4):
        single = tiny_generator.generate([PROMPTS[i]], [None], [SEEDS[i]], SETTINGS)[0]
        assert _max_diff(single, batched[i]) <= 2
    reordered = tiny_generator.generate(PROMPTS[::-1], [None] * 4, SEEDS[::-1], SETTINGS)
    assert _max_diff(reordered[::-1], batched) <= 2
    assert _max_diff(batched[0], batched[1]) > 10  # different rows really differ


def test_plain_diffusers_call_reproduces_an_image(tiny_generator: ImageGenerator, tiny_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ours = tiny_generator.generate(PROMPTS, [None] * 4, SEEDS, SETTINGS)
    for i in (0, 2):
        image = pipe(
            PROMPTS[i],
            num_inference_steps=4,
            guidance_scale=0.0,
            width=128,
            height=128,
            generator=torch.Generator("cpu").manual_seed(SEEDS[i]),
        ).images[0]
        assert _max_diff(np.asarray(image), ours[i]) <= 2


def test_guidance_and_negative_prompts_take_effect(tiny_generator: ImageGenerator) -> None:
    cfg = RenderSettings(width=128, height=128, steps=2, guidance_scale=3.0, negative=True)
    with_negative = tiny_generator.generate(PROMPTS[:1], ["blurry"], SEEDS[:1], cfg)
    other_negative = tiny_generator.generate(PROMPTS[:1], ["sharp"], SEEDS[:1], cfg)
    assert _max_diff(with_negative, other_negative) > 0


def _save_unet(tiny_dir: Path, target: Path, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(tiny_dir), subfolder="unet"))
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target))
    return state


def _lightning_on_tiny(tiny_dir: Path, model_cache: Path, unet: Path) -> ImageGenerator:
    """On the CPU in float32: the loaded weights are compared with the saved ones as they are."""
    return ImageGenerator(
        ModelConfig(
            preset="lightning-4step", path=str(tiny_dir), unet=str(unet), cache_dir=str(model_cache), device="cpu"
        )
    )


def test_lightning_unet_from_a_local_file(tiny_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    state = _save_unet(tiny_dir, tmp_path / "sdxl_lightning_4step_unet.safetensors", seed=1)
    generator = _lightning_on_tiny(tiny_dir, model_cache, tmp_path / "sdxl_lightning_4step_unet.safetensors")
    generator.load()
    scheduler = generator.pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    loaded = generator.pipe.unet.state_dict()
    name = next(iter(state))
    assert torch.equal(loaded[name], state[name])


def test_unet_that_does_not_fit_is_a_clear_error(tiny_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"wrong": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    generator = _lightning_on_tiny(tiny_dir, model_cache, tmp_path / "bad.safetensors")
    with pytest.raises(ModelError, match="do not fit"):
        generator.load()


def test_hub_ids_resolve_offline_from_the_cache(tiny_hub: Path, model_cache: Path) -> None:
    """The real names (SDXL base hub id, hf://ByteDance/SDXL-Lightning/...) under HF_HUB_OFFLINE=1."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    generator = ImageGenerator(ModelConfig(preset="lightning-4step", cache_dir=str(model_cache)))
    generator.load()
    assert generator.generate(["a cat"], [None], [1], RenderSettings(64, 64, 4, 0.0)).shape == (1, 64, 64, 3)
    missing = ImageGenerator(
        ModelConfig(
            preset="lightning-4step", unet="hf://ByteDance/SDXL-Lightning/sdxl_lightning_16step_unet.safetensors"
        )
    )
    with pytest.raises(ModelError) as info:
        missing.load()
    message = str(info.value)
    assert "sdxl_lightning_16step_unet.safetensors from hub repo ByteDance/SDXL-Lightning" in message
    assert "HF_HUB_OFFLINE" in message


class _RunsOutOfMemoryAbove:
    """Stands in for the pipeline: raises CUDA's out-of-memory error for calls over `limit` images."""

    def __init__(self, pipe: object, limit: int):
        self.pipe, self.limit = pipe, limit
        self.calls: list[int] = []

    def __call__(self, *, prompt_embeds: torch.Tensor, **kwargs: object) -> object:
        n = prompt_embeds.shape[0]
        self.calls.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({n} images)")
        return self.pipe(prompt_embeds=prompt_embeds, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)


def test_out_of_memory_splits_the_batch_and_keeps_the_smaller_size(tiny_generator: ImageGenerator) -> None:
    prompts, seeds = [*PROMPTS, "a fifth prompt"], [*SEEDS, 11]
    expected = tiny_generator.generate(prompts, [None] * 5, seeds, SETTINGS)
    real_pipe = tiny_generator.pipe
    tiny_generator.pipe = _RunsOutOfMemoryAbove(real_pipe, limit=2)
    try:
        images, sizes = tiny_generator.render(prompts, [None] * 5, seeds, SETTINGS)
        assert tiny_generator.pipe.calls == [5, 2, 2, 1]  # one failed call, then halves that fit
        assert sizes == [2, 2, 2, 2, 1] and tiny_generator.oom_retries == 1 and tiny_generator.max_batch == 2
        assert _max_diff(images, expected) <= 2  # splitting does not change the images
        tiny_generator.render(prompts[:4], [None] * 4, seeds[:4], SETTINGS)
        assert tiny_generator.pipe.calls[4:] == [2, 2] and tiny_generator.oom_retries == 1  # no new failures

        tiny_generator.pipe = _RunsOutOfMemoryAbove(real_pipe, limit=0)
        with pytest.raises(ModelError, match="one 128x128 image does not fit in the cpu memory"):
            tiny_generator.render(prompts[:1], [None], seeds[:1], SETTINGS)
    finally:
        tiny_generator.pipe, tiny_generator.max_batch, tiny_generator.oom_retries = real_pipe, None, 0


def test_other_errors_are_not_retried(tiny_generator: ImageGenerator) -> None:
    real_pipe = tiny_generator.pipe

    class Broken(_RunsOutOfMemoryAbove):
        def __call__(self, **kwargs: object) -> object:
            raise ValueError("not a memory problem")

    tiny_generator.pipe = Broken(real_pipe, limit=100)
    try:
        with pytest.raises(ValueError, match="not a memory problem"):
            tiny_generator.render(PROMPTS, [None] * 4, SEEDS, SETTINGS)
        assert tiny_generator.oom_retries == 0 and tiny_generator.max_batch is None
    finally:
        tiny_generator.pipe = real_pipe


def test_each_phase_is_timed(tiny_generator: ImageGenerator) -> None:
    tiny_generator.stage_seconds.clear()
    tiny_generator.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SETTINGS)
    phases = tiny_generator.stage_seconds
    assert set(phases) == {"text_encode", "denoise", "vae_decode", "to_host"}
    assert all(seconds > 0 for seconds in phases.values())
    assert phases["denoise"] > phases["text_encode"]  # 4 UNet steps against one pass of the encoders


def test_token_counts_flag_prompts_over_the_clip_limit(tiny_generator: ImageGenerator) -> None:
    long_prompt = " ".join(["a red dog"] * 40)
    counts, limit = tiny_generator.token_counts(["a red dog", long_prompt, None, ""])
    assert limit == 77
    assert 3 <= counts[0] <= 10 and counts[1] > 77 and counts[2:] == [0, 0]


def test_compile_wraps_the_unet_lazily(model_cache: Path) -> None:
    """`model.compile` hands the UNet to torch.compile at load; compilation itself waits for the
    first call (tune measures whether it pays off, leaving that first call out)."""
    import torch

    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), compile=True))
    generator.load()
    assert isinstance(generator.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    # Room for every (size, CFG) shape of a mixed manifest, times the batch sizes tune sweeps.
    assert torch._dynamo.config.recompile_limit >= 64


def test_configure_rebatches_a_loaded_model_and_strict_calls_raise_instead_of_splitting(
    tiny_generator: ImageGenerator,
) -> None:
    # `tune` sweeps batch sizes on one loaded model: calls are cut at the configured size, and an
    # out-of-memory error is the finding (not split), with the memory it held freed.
    prompts, seeds = [*PROMPTS, "a fifth prompt"], [*SEEDS, 11]
    real_pipe, before = tiny_generator.pipe, (tiny_generator.batch_size, tiny_generator.model)
    tiny_generator.pipe = _RunsOutOfMemoryAbove(real_pipe, limit=2)
    try:
        tiny_generator.configure(batch_size=2, vae_batch_size=1, split_on_oom=False)
        assert tiny_generator.model.vae_batch_size == 1 and tiny_generator.decode_chunk(SETTINGS) == 1
        _, sizes = tiny_generator.render(prompts, [None] * 5, seeds, SETTINGS)
        assert tiny_generator.pipe.calls == [2, 2, 1] and sizes == [2, 2, 2, 2, 1]  # calls of the batch size
        tiny_generator.configure(batch_size=4, vae_batch_size=None, split_on_oom=False)
        with pytest.raises(ModelError, match="out of memory rendering 4 images at 128x128"):
            tiny_generator.render(prompts, [None] * 5, seeds, SETTINGS)
        assert tiny_generator.oom_retries == 0 and tiny_generator.max_batch is None
    finally:
        tiny_generator.pipe = real_pipe
        tiny_generator.configure(batch_size=before[0] or 4, vae_batch_size=None, split_on_oom=True)
        tiny_generator.batch_size, tiny_generator.model = before


class _StubWatermarker:
    """Stands in for diffusers' StableDiffusionXLWatermarker (which needs `invisible-watermark`)."""

    calls = 0

    def apply_watermark(self, images: torch.Tensor) -> torch.Tensor:
        _StubWatermarker.calls += 1
        return images


@pytest.fixture
def watermark_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers as it behaves with `invisible-watermark` installed: SDXL pipelines build a watermarker."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as sdxl

    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    monkeypatch.setattr(sdxl, "StableDiffusionXLWatermarker", _StubWatermarker, raising=False)


@pytest.mark.usefixtures("watermark_installed")
def test_no_watermark_unless_asked(model_cache: Path) -> None:
    """With `invisible-watermark` installed diffusers watermarks every image on the CPU; a
    generator holds no watermarker unless `model.watermark` asks for one, and then applies it."""
    plain = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache)))
    plain.load()
    assert plain.pipe.watermark is None
    marked = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), watermark=True))
    marked.load()
    assert isinstance(marked.pipe.watermark, _StubWatermarker)
    before = _StubWatermarker.calls
    marked.generate(PROMPTS[:2], [None] * 2, SEEDS[:2], SETTINGS)
    assert _StubWatermarker.calls == before + 1


def test_a_watermark_without_its_package_is_refused(model_cache: Path) -> None:
    from diffusers.utils.import_utils import is_invisible_watermark_available

    if is_invisible_watermark_available():
        pytest.skip("invisible-watermark is installed here")
    with pytest.raises(ModelError, match="install `invisible-watermark`"):
        ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), watermark=True)).load()


def test_a_16_bit_model_reads_the_base_pipelines_fp16_files(
    tmp_path: Path, tiny_dir: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The base pipeline's fp16 files are read for a 16-bit model where they exist (as every SDXL
    model card loads them), its default files otherwise. Here the fp16 files hold other weights
    than the float32 ones, so the loaded UNet shows which files were read."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "base"
    shutil.copytree(tiny_dir, folder)
    shifted = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        for parameter in shifted.unet.parameters():
            parameter.add_(0.5)
    shifted.to(torch.float16).save_pretrained(str(folder), variant="fp16")
    default = next(StableDiffusionXLPipeline.from_pretrained(str(tiny_dir)).unet.parameters())
    fp16 = next(shifted.unet.parameters())

    def first_unet_weight(path: Path, dtype: Literal["float32", "bfloat16"]) -> torch.Tensor:
        model = ModelConfig(preset="tiny", path=str(path), dtype=dtype, cache_dir=str(model_cache), device="cpu")
        generator = ImageGenerator(model)  # on the CPU, beside the weights it is compared with
        generator.load()
        assert generator.pipe is not None
        weight: torch.Tensor = next(generator.pipe.unet.parameters()).float()
        return weight

    assert torch.equal(first_unet_weight(folder, "bfloat16"), fp16.to(torch.bfloat16).float())
    assert torch.equal(first_unet_weight(folder, "float32"), default.float())
    with caplog.at_level("INFO", logger="pipeline.models.generator"):
        assert torch.equal(first_unet_weight(tiny_dir, "bfloat16"), default.to(torch.bfloat16).float())
    assert "no fp16 variant in" in caplog.text


def test_offline_hub_notices_are_dropped_only_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE set every actor's load logged that it could not reach the Hub: dropped;
    online (a real network problem) they still show, and other warnings always do."""
    import logging

    from huggingface_hub import constants

    from pipeline.models.generator import OfflineHubNotices

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("huggingface_hub.hf_api", logging.WARNING, __file__, 1, message, None, None)

    notice = record("Could not reach the Hub (offline mode is enabled). Using cached commit hash for 'x'.")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not OfflineHubNotices().filter(notice)
    assert OfflineHubNotices().filter(record("something else"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert OfflineHubNotices().filter(notice)

"""A busy figure that can fail: the UNet's forward passes timed apart from the call's phases.

The phases of a model call (text encoding, denoising, decoding, the copy to the host) span the
whole call on the device's timeline, so their share of wall time is about 1 whatever happens in
between. The UNet's passes are timed on their own (`ImageGenerator.unet_seconds`); the denoising
phase less them is the time the device waits between steps, which a slow host step shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import ModelConfig
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator

SETTINGS = RenderSettings(width=64, height=64, steps=4, guidance_scale=0.0)
PROMPTS = ["a red car", "a dog at night"]


def _generator(model_cache: Path) -> ImageGenerator:
    generator = ImageGenerator(ModelConfig(preset="tiny", cache_dir=str(model_cache), device="cpu"))
    generator.load()
    return generator


def _shares(generator: ImageGenerator) -> tuple[float, float, float]:
    """(UNet seconds, denoise seconds, wall seconds) of two calls."""
    generator.stage_seconds.clear()
    generator.unet_seconds = 0.0
    start = time.perf_counter()
    for _ in range(2):
        generator.generate(PROMPTS, [None, None], [1, 2], SETTINGS)
    return generator.unet_seconds, generator.stage_seconds["denoise"], time.perf_counter() - start


def test_the_unet_passes_are_timed_within_denoising(model_cache: Path) -> None:
    unet, denoise, wall = _shares(_generator(model_cache))
    assert 0 < unet < denoise < wall
    assert "unet" not in _generator(model_cache).stage_seconds  # not a phase: it lies within `denoise`


def test_a_slow_host_step_between_unet_passes_shows(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler step that holds the host 50 ms (as a synchronising copy or a CPU-side step
    would hold a GPU): the phases still cover the calls, the UNet's share falls."""
    generator = _generator(model_cache)
    assert generator.pipe is not None
    step = generator.pipe.scheduler.step

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return step(*args, **kwargs)

    monkeypatch.setattr(generator.pipe.scheduler, "step", slow_step)
    unet, denoise, wall = _shares(generator)
    phases = sum(generator.stage_seconds.values())
    work = unet + generator.stage_seconds["vae_decode"]  # what the GPU check calls the work share
    held = 2 * 4 * 0.05  # two calls of four steps, the host 50 ms before each pass's result is used
    assert phases / wall > 0.9  # the phases' share: about 1, whatever the host does
    assert denoise - unet >= 0.9 * held and phases - work >= 0.9 * held  # the work share falls by it

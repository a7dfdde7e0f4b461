"""The speed switches (issue 8): each changes how the images are computed, never what they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ModelConfig
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator

PROMPTS = ["a fish made out of dendrobium flowers", "3d isometric dungeon game", "a red car"]
SEEDS = [501798843, 3812179903, 7]
SETTINGS = RenderSettings(width=64, height=64, steps=2, guidance_scale=0.0)
# Each switch is checked where it acts, in the precision jobs use there: on the CPU in float32,
# and on CUDA (the `gpu` variants, skipped without it) in bfloat16.
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
CUDA_LAYOUT = ["fuse_qkv", "channels_last", "vae_channels_last"]


def _render(model_cache: Path, device: str, **switches: object) -> tuple[np.ndarray, list[str]]:
    model = {"preset": "tiny", "cache_dir": str(model_cache), "device": device, "dtype": DTYPES[device], **switches}
    generator = ImageGenerator(ModelConfig.model_validate(model))
    generator.load()
    return generator.generate(PROMPTS, [None] * 3, SEEDS, SETTINGS).astype(np.int16), generator.techniques


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> Callable[[str], np.ndarray]:
    """The default switches' images on a device, rendered once per module and device."""
    images: dict[str, np.ndarray] = {}

    def on(device: str) -> np.ndarray:
        if device not in images:
            images[device], techniques = _render(model_cache, device)
            # The layout and fusion switches act on CUDA only; SDPA is the default.
            assert techniques == (CUDA_LAYOUT if device == "cuda" else [])
        return images[device]

    return on


def _variants(device: str, switches: list[dict[str, object]]) -> list[object]:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return [
        pytest.param(device, s, marks=marks, id=f"{device}-" + "-".join(f"{k}={v}" for k, v in s.items()))
        for s in switches
    ]


EVERYWHERE: list[dict[str, object]] = [{"attention": "eager"}, {"vae_batch_size": 1}, {"vae_batch_size": 2}]
CUDA_ONLY: list[dict[str, object]] = [
    {name: False} for name in ("fuse_qkv", "channels_last", "vae_channels_last", "pinned_copy")
]


@pytest.mark.parametrize(
    ("device", "switches"), _variants("cpu", EVERYWHERE) + _variants("cuda", EVERYWHERE + CUDA_ONLY)
)
def test_switches_keep_the_images(
    model_cache: Path, reference: Callable[[str], np.ndarray], device: str, switches: dict[str, object]
) -> None:
    images, techniques = _render(model_cache, device, **switches)
    assert np.abs(images - reference(device)).max() <= 2
    if switches.get("attention") == "eager":
        # Eager attention leaves the q/k/v projections unfused.
        assert techniques == ["attention=eager", *(CUDA_LAYOUT[1:] if device == "cuda" else [])]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_flash_attention_keeps_the_images(model_cache: Path, device: str) -> None:
    """Flash needs 16-bit precision (refused in float32): compared with SDPA in bfloat16."""
    sdpa, _ = _render(model_cache, device, dtype="bfloat16")
    flash, techniques = _render(model_cache, device, dtype="bfloat16", attention="flash")
    assert "attention=flash" in techniques
    assert np.abs(flash - sdpa).max() <= 2

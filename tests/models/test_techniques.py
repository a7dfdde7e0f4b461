"""The speed switches (issue 8): each changes how the images are computed, never what they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator

PROMPTS = ["a fish made out of dendrobium flowers", "3d isometric dungeon game", "a red car"]
SEEDS = [501798843, 3812179903, 7]
SETTINGS = RenderSettings(width=64, height=64, steps=2, guidance_scale=0.0)
REPO = Path(__file__).resolve().parents[2]
# On a CUDA machine the switches are checked where they act, in the precision jobs use there.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
CUDA_LAYOUT = ["fuse_qkv", "channels_last", "vae_channels_last"]


def _render(model_cache: Path, **switches: object) -> tuple[np.ndarray, list[str]]:
    model = {"preset": "tiny", "cache_dir": str(model_cache), "device": DEVICE, "dtype": DTYPE, **switches}
    generator = ImageGenerator(ModelConfig.model_validate(model))
    generator.load()
    return generator.generate(PROMPTS, [None] * 3, SEEDS, SETTINGS).astype(np.int16), generator.techniques


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> np.ndarray:
    images, techniques = _render(model_cache)
    # The layout and fusion switches act on CUDA only; SDPA is the default.
    assert techniques == (CUDA_LAYOUT if DEVICE == "cuda" else [])
    return images


SWITCHES = [{"attention": "eager"}, {"vae_batch_size": 1}, {"vae_batch_size": 2}]
if DEVICE == "cuda":
    SWITCHES += [{name: False} for name in ("fuse_qkv", "channels_last", "vae_channels_last", "pinned_copy")]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_switches_keep_the_images(model_cache: Path, reference: np.ndarray, switches: dict[str, object]) -> None:
    images, techniques = _render(model_cache, **switches)
    assert np.abs(images - reference).max() <= 2
    if switches.get("attention") == "eager":
        assert techniques == ["attention=eager", *CUDA_LAYOUT[1:]] if DEVICE == "cuda" else ["attention=eager"]


def test_flash_attention_keeps_the_images(model_cache: Path) -> None:
    """Flash needs 16-bit precision (refused in float32): compared with SDPA in bfloat16."""
    sdpa, _ = _render(model_cache, dtype="bfloat16")
    flash, techniques = _render(model_cache, dtype="bfloat16", attention="flash")
    assert "attention=flash" in techniques
    assert np.abs(flash - sdpa).max() <= 2

"""Single-file UNets built on the meta device and streamed into the target dtype and device; fp16
variants of folder UNets. The reference is the old path: a randomly initialised float32 UNet,
`load_state_dict`, then a cast."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ModelError
from pipeline.models.generator import ImageGenerator
from pipeline.models.loading import Backend, WeightsMismatch, load_unet_file, load_weights
from pipeline.models.presets import FP16_FIX_VAE
from pipeline.models.tiny import fp16_state, tiny_unet
from pipeline.models.weights import fp16_variant, load_state_dict_file

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _config(tiny_dir: Path) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    config: dict[str, Any] = UNet2DConditionModel.load_config(str(tiny_dir), subfolder="unet")
    return config


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


def _old_path(config: dict[str, Any], path: Path, dtype: torch.dtype) -> Any:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(load_state_dict_file(str(path)))
    return unet.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("filename", "stored", "backend"),
    [
        ("unet.safetensors", torch.float16, "pread"),
        ("unet.safetensors", torch.float16, "mmap"),
        ("unet.safetensors", torch.float32, "pread"),
        ("unet_fp16.bin", torch.float16, "pread"),
    ],
    ids=["fp16-safetensors-pread", "fp16-safetensors-mmap", "fp32-safetensors", "fp16-bin"],
)
def test_streamed_weights_equal_the_old_path(
    tiny_dir: Path, tmp_path: Path, filename: str, stored: torch.dtype, backend: Backend, dtype: torch.dtype
) -> None:
    config = _config(tiny_dir)
    source = tiny_unet(tiny_dir, seed=5)
    state = fp16_state(source) if stored == torch.float16 else source.state_dict()
    path = _save(state, tmp_path / filename)
    unet = load_unet_file(config, str(path), dtype=dtype, device="cpu", backend=backend)
    expected = _old_path(config, path, dtype).state_dict()
    loaded = unet.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype and tensor.device.type == "cpu", name
        assert torch.equal(tensor, expected[name]), name
    assert not any(p.is_meta for p in unet.parameters()) and not any(b.is_meta for b in unet.buffers())
    assert not unet.training  # as from_pretrained leaves a model


def test_weights_do_not_share_memory_with_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    """Same dtype on the CPU through a memory map: still a copy, so the file may change later."""
    path = _save(fp16_state(tiny_unet(tiny_dir, seed=5)), tmp_path / "unet.safetensors")
    unet = load_unet_file(_config(tiny_dir), str(path), dtype=torch.float16, device="cpu", backend="mmap")
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    _save({name: torch.zeros_like(t) for name, t in before.items()}, tmp_path / "unet.safetensors")
    assert all(torch.equal(tensor, before[name]) for name, tensor in unet.state_dict().items())


@pytest.mark.gpu
def test_streamed_straight_to_the_gpu(tiny_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_dir)
    path = _save(fp16_state(tiny_unet(tiny_dir, seed=5)), tmp_path / "unet.safetensors")
    unet = load_unet_file(config, str(path), dtype=torch.bfloat16, device="cuda")
    expected = _old_path(config, path, torch.bfloat16).state_dict()
    for name, tensor in unet.state_dict().items():
        assert tensor.device.type == "cuda" and tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor.cpu(), expected[name]), name


def _broken(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    first = next(iter(state))
    if how == "missing":
        del state[first]
    elif how == "unexpected":
        state["extra.weight"] = torch.zeros(2)
    else:
        state[first] = torch.zeros(3, 3)
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "1 missing key ("),
        ("unexpected", "1 unexpected key (extra.weight)"),
        ("reshaped", "has shape [3, 3]"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_weights_that_do_not_fit_are_a_clear_error(
    tiny_dir: Path, tmp_path: Path, how: str, message: str, suffix: str
) -> None:
    path = _save(_broken(fp16_state(tiny_unet(tiny_dir, seed=5)), how), tmp_path / f"unet{suffix}")
    with pytest.raises(ModelError, match="UNet weights hf://org/repo/unet do not fit the base pipeline's UNet") as info:
        load_unet_file(_config(tiny_dir), str(path), dtype=torch.float32, device="cpu", name="hf://org/repo/unet")
    assert message in str(info.value)


def test_unreadable_checkpoints_are_a_clear_error(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_unet_file(_config(tiny_dir), str(tmp_path / "garbage.safetensors"), dtype=torch.float32, device="cpu")
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(ModelError, match="does not hold a state dict"):
        load_unet_file(_config(tiny_dir), str(tmp_path / "list.bin"), dtype=torch.float32, device="cpu")


def test_a_pickle_in_the_legacy_format_is_read_whole(tiny_dir: Path, tmp_path: Path) -> None:
    """torch.save's format before 1.6 cannot be memory-mapped; it still loads."""
    state = fp16_state(tiny_unet(tiny_dir, seed=5))
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    unet = load_unet_file(_config(tiny_dir), str(tmp_path / "legacy.bin"), dtype=torch.float16, device="cpu")
    assert all(torch.equal(tensor, state[name]) for name, tensor in unet.state_dict().items())


class _WithBuffers(nn.Module):
    steps: torch.Tensor

    def __init__(self, *, non_persistent: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        if non_persistent:
            self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_buffers_are_loaded_and_unbuildable_ones_refused(tmp_path: Path) -> None:
    real = _WithBuffers()
    real.steps.fill_(7)
    path = _save({k: v.contiguous() for k, v in real.state_dict().items()}, tmp_path / "m.safetensors")
    with torch.device("meta"):
        module = _WithBuffers()
    load_weights(module, str(path), dtype=torch.bfloat16, device="cpu")
    assert module.steps.dtype == torch.int64 and int(module.steps) == 7  # integer tensors keep their dtype
    assert module.linear.weight.dtype == torch.bfloat16
    with torch.device("meta"):
        unbuildable = _WithBuffers(non_persistent=True)  # its buffer is in no checkpoint
    with pytest.raises(WeightsMismatch, match="table"):
        load_weights(unbuildable, str(path), dtype=torch.float32, device="cpu")


def test_fp16_variant_of_hub_folders(tiny_hub: Path) -> None:
    assert fp16_variant("latent-consistency/lcm-sdxl", torch.float16) == "fp16"
    assert fp16_variant("latent-consistency/lcm-sdxl", torch.bfloat16) == "fp16"
    assert fp16_variant("latent-consistency/lcm-sdxl", torch.float32) is None
    assert fp16_variant(FP16_FIX_VAE, torch.float16) is None  # cached, without an fp16 file
    assert fp16_variant("nobody/not-in-the-cache", torch.float16) is None  # offline, not cached


@pytest.mark.parametrize(("dtype", "seed"), [("float16", 2), ("float32", 1)])
def test_folder_unets_take_the_fp16_variant_for_16_bit_models(
    tiny_dir: Path, model_cache: Path, tiny_hub: Path, tmp_path: Path, dtype: Literal["float16", "float32"], seed: int
) -> None:
    """A folder with float32 weights (seed 1) and an fp16 variant that differs (seed 2), to tell
    which file was read."""
    folder = tmp_path / "unet"
    tiny_unet(tiny_dir, seed=1).save_pretrained(str(folder))
    tiny_unet(tiny_dir, seed=2).half().save_pretrained(str(folder), variant="fp16")
    generator = ImageGenerator(  # on the CPU, beside the weights it is compared with
        ModelConfig(
            preset="tiny", path=str(tiny_dir), unet=str(folder), dtype=dtype, cache_dir=str(model_cache), device="cpu"
        )
    )
    generator.load()
    expected = tiny_unet(tiny_dir, seed=seed).to(getattr(torch, dtype)).state_dict()
    loaded = generator.pipe.unet.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.items())

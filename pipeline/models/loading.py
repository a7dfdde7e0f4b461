"""Loading a single-file UNet checkpoint straight into the target dtype and device.

Contract: `load_unet_file(config, path, dtype=..., device=...)` returns the UNet described by
`config` holding exactly the checkpoint's tensors (floating-point ones converted to `dtype`), every
one on `device`. The checkpoint must fit the config exactly: a missing key, an unexpected key or a
shape that differs is a `ModelError` raised before any tensor is copied. `.safetensors` files and
`.bin` torch pickles (DMD2 ships one; read with `weights_only=True`, so a file can carry tensors,
never code) are accepted.

Why not `from_config` + `load_state_dict` + a cast, as before: `from_config` builds a full float32
UNet and runs its random initialisation on the CPU (issue 13 measured 141 s for SDXL's 2.6 B
parameters on the one thread Ray gives a GPU actor; 14 s on our 2-core AMD EPYC), and the float32
weights sat in host memory next to the mapped checkpoint: peak RSS 3.0x the file (14.4 GiB for
SDXL), 2.0x of it the process's own, per actor, 8 actors per node. Here the UNet is built on the
meta device (shapes only: no memory, no initialisation), then the checkpoint is streamed one tensor
at a time into a tensor allocated on the target device in the target dtype, and the module adopts
those tensors (`load_state_dict(assign=True)`).

How each tensor is read, and why: safetensors' `safe_open` with its `pread` backend reads each
tensor into a buffer of its own, which becomes the parameter when no conversion is needed, or is
converted (or moved to the GPU) and dropped. The other candidate, the default `mmap` backend, maps
the whole file: every page it touches stays in the process's resident set until the file is closed,
so peak RSS reaches checkpoint + model, although those pages are the kernel's page cache
(file-backed, shared by the actors of a node, reclaimable). Measured on a full-size SDXL UNet
(benchmarks/load_time.py, one thread, file in the page cache; benchmarks/results/load_time.md): to
a 16-bit model on the CPU, `pread` peaks at 1.00-1.05x the file in RSS and in anonymous memory;
`mmap` at 1.0x in anonymous memory but 2.0x in RSS, and is about 20 % faster (one memory copy less
per tensor). Both take under 2x the time of reading the file into memory (old path: 4x, and 3.0x
the file in RSS). `pread` is the default because it meets the memory target on both measures, so an
actor's RSS says what it really holds; on CUDA it should hold about one tensor on the host (not yet
measured: no GPU was lent to these sessions). `.bin` files are read with `torch.load(weights_only=True, mmap=True)`,
the only lazy reader torch has for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

from pipeline.core.errors import ModelError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Backend = Literal["pread", "mmap"]
# See the module docstring: pread keeps peak RSS at the model's size, mmap is ~20 % faster.
DEFAULT_BACKEND: Backend = "pread"
_EXAMPLES = 3  # key names quoted in a mismatch message


class WeightsMismatch(ValueError):
    """A checkpoint's keys or shapes differ from the module it is loaded into."""


@dataclass(frozen=True)
class Checkpoint:
    """An open checkpoint file: every tensor's shape from its header, and a reader per tensor.

    `owned`: whether `read` returns a buffer of the tensor's own (pread) rather than a view of the
    file's memory map, which must be copied before the file closes."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    owned: bool


@contextmanager
def open_checkpoint(path: str, *, backend: Backend = DEFAULT_BACKEND) -> Iterator[Checkpoint]:
    """Open a `.safetensors` file (or a torch pickle) without reading its tensors yet."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            handle = safe_open(path, framework="pt", backend=backend)
        except Exception as error:  # safetensors raises its own SafetensorError for a bad header
            raise ModelError(f"{path} is not a readable safetensors file: {error}") from None
        with handle as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
            yield Checkpoint(shapes, file.get_tensor, owned=backend == "pread")
        return
    state, mapped = _load_pickle(path)
    yield Checkpoint({key: tuple(tensor.shape) for key, tensor in state.items()}, state.__getitem__, owned=not mapped)


def _load_pickle(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """A torch pickle's tensors, and whether they are memory-mapped (where the format allows it)."""
    import torch

    mapped = True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "zipfile" not in str(error):
            raise ModelError(f"cannot read {path} as a torch checkpoint: {error}") from None
        logger.warning("%s predates torch's zip format and cannot be memory-mapped: reading it whole", path)
        state, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state, mapped


def mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between the keys and shapes a module expects and a checkpoint's, or None."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    problems = [
        f"{_count(len(keys), adjective + ' key')} ({_examples(keys)})"
        for adjective, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    for key in reshaped[:_EXAMPLES]:
        problems.append(f"{key} has shape {list(found[key])}, the model expects {list(expected[key])}")
    if len(reshaped) > _EXAMPLES:
        problems.append(f"{_count(len(reshaped) - _EXAMPLES, 'more key')} of another shape")
    return "; ".join(problems) or None


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def converted_copy(source: torch.Tensor, *, dtype: torch.dtype, device: str, owned: bool) -> torch.Tensor:
    """`source` on `device`, floating-point values converted to `dtype`, in memory of its own.

    On a GPU the tensor crosses in the file's dtype and is converted there, so the host holds no
    converted copy. A view of a memory-mapped file is always copied (`owned=False`): the model
    must not depend on the file staying unchanged after loading."""
    target = dtype if source.is_floating_point() else source.dtype
    moved = source.to(device)
    if moved is source and not owned:  # a view of the file's mapping: convert or copy, in one pass
        return source.to(target, copy=True)
    return moved.to(target)


def load_weights(
    module: Any, path: str, *, dtype: torch.dtype, device: str, backend: Backend = DEFAULT_BACKEND
) -> None:
    """Give a module built on the meta device the tensors of a checkpoint, on `device` in `dtype`.

    Raises:
        WeightsMismatch: the checkpoint's keys or shapes differ from the module's, or the module
            has tensors that a checkpoint cannot hold (non-persistent buffers) and that would stay
            on the meta device.
    """
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    with open_checkpoint(path, backend=backend) as checkpoint:
        problem = mismatch(expected, checkpoint.shapes)
        if problem:
            raise WeightsMismatch(problem)
        state = {
            name: converted_copy(checkpoint.read(name), dtype=dtype, device=device, owned=checkpoint.owned)
            for name in expected
        }
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, tensor in chain(module.named_parameters(), module.named_buffers()) if tensor.is_meta]
    if left:
        raise WeightsMismatch(f"{len(left)} tensors are not in any checkpoint and stay unbuilt: {', '.join(left[:5])}")


def load_unet_file(
    config: dict[str, Any],
    path: str,
    *,
    dtype: torch.dtype,
    device: str,
    name: str | None = None,
    backend: Backend = DEFAULT_BACKEND,
) -> Any:
    """A `UNet2DConditionModel` of `config` holding the weights of the checkpoint at `path`.

    Args:
        config: the UNet's config (e.g. the base pipeline's `unet/config.json`).
        path: a local `.safetensors` or `.bin` file in diffusers' key layout.
        dtype: the dtype of the floating-point weights.
        device: where the weights go ("cuda", "cpu").
        name: how error messages call the weights (the user's reference); defaults to `path`.
        backend: how safetensors reads each tensor; see the module docstring.

    Raises:
        ModelError: the file cannot be read, or does not fit the config.
    """
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        load_weights(unet, path, dtype=dtype, device=device, backend=backend)
    except WeightsMismatch as error:
        raise ModelError(f"UNet weights {name or path} do not fit the base pipeline's UNet: {error}") from None
    return unet.eval()  # as from_pretrained leaves it

"""Where an actor renders and in what precision, and the errors a smaller batch may avoid."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import ModelError

if TYPE_CHECKING:
    import torch


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible to this actor")
    return requested


def choose_dtype(requested: str, device: str) -> torch.dtype:
    import torch

    if requested == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype: torch.dtype = getattr(torch, requested)
    return dtype


def is_out_of_memory(error: BaseException) -> bool:
    """True for an accelerator (or host) allocation failure, which a smaller batch may avoid."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message.lower() or "can't allocate memory" in message
    )

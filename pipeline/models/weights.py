"""Resolving where weights come from: hub ids and files, local folders and files, object stores.

Object-store sources are copied once per node into a local cache. A file lock plus a completion
marker written last means that N actors starting together on one node download once, and that a
copy interrupted half-way is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ModelError
from pipeline.core.io import STORAGE_ERRORS, filesystem, is_remote
from pipeline.core.uris import weights_source_problem
from pipeline.models.presets import TINY

if TYPE_CHECKING:
    import torch

    from pipeline.core.config import StorageConfig

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMPLETE = ".sdxl-batch-complete"


def check_source(ref: str) -> None:
    problem = weights_source_problem(ref)
    if problem:
        raise ModelError(f"{ref!r}: {problem}")


def default_cache_dir(configured: str | None) -> Path:
    return Path(configured or os.path.join(os.path.expanduser("~"), ".cache", "sdxl-batch"))


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def materialize(cache_dir: Path, key: str, build: Callable[[Path], object]) -> Path:
    """Return `cache_dir/key`, building it once per node under a file lock."""
    from filelock import FileLock

    target = cache_dir / key
    if (target / _COMPLETE).exists():
        return target
    (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / "locks" / f"{key.replace('/', '_')}.lock")):
        if (target / _COMPLETE).exists():
            return target
        staging = cache_dir / f".partial-{uuid.uuid4().hex}"
        try:
            build(staging)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        (target / _COMPLETE).touch()
    return target


def _copy_remote(uri: str, storage: StorageConfig | None, destination: Path, *, single_file: bool) -> None:
    fs, path = filesystem(uri, storage)
    try:
        if single_file:
            destination.mkdir(parents=True)
            fs.get_file(path, str(destination / os.path.basename(path)))
        else:
            if not fs.isdir(path):
                raise ModelError(f"model folder not found in object storage: {uri}")
            fs.get(path.rstrip("/") + "/", str(destination), recursive=True)
    except ModelError:
        raise
    except FileNotFoundError as error:
        raise ModelError(f"model weights not found in object storage: {uri}") from error
    except STORAGE_ERRORS as error:
        raise ModelError(f"cannot copy model weights from {uri}: {type(error).__name__}: {error}") from error


def resolve_folder(ref: str, *, storage: StorageConfig | None, cache_dir: Path, marker: str) -> str:
    """A local folder or hub id that diffusers' `from_pretrained` can load.

    `ref` is a hub id (`ORG/NAME` or `hf://ORG/NAME`), a local folder holding `marker`, or an
    object-store URI of such a folder (copied once per node into the cache).
    """
    check_source(ref)
    if ref.startswith("hf://"):
        return ref.removeprefix("hf://").strip("/")
    if is_remote(ref):
        copy = materialize(cache_dir, f"models/{_key(ref)}", lambda d: _copy_remote(ref, storage, d, single_file=False))
        return str(copy)
    local = ref.removeprefix("file://")
    if os.path.isdir(local):
        if not os.path.exists(os.path.join(local, marker)):
            raise ModelError(f"{local} is not a diffusers folder of the expected kind (no {marker})")
        return local
    if _HUB_ID.fullmatch(ref) and not os.path.exists(local):
        return ref
    raise ModelError(f"{ref!r} is neither a local diffusers folder, an object-store URI, nor a hub id (ORG/NAME)")


def resolve_pipeline_source(path: str, *, storage: StorageConfig | None, cache_dir: Path) -> str:
    """A local folder or hub id that `from_pretrained` can load, for `model.path`."""
    if path == TINY:
        from pipeline.models.tiny import TINY_VERSION, build_tiny_pipeline

        return str(materialize(cache_dir, f"tiny-v{TINY_VERSION}", build_tiny_pipeline))
    return resolve_folder(path, storage=storage, cache_dir=cache_dir, marker="model_index.json")


# Where a diffusers model folder keeps its fp16 weights beside the default (float32) ones: one file,
# or the index of a sharded checkpoint (named as diffusers' `_add_variant` names it).
_FP16_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json")


def fp16_variant(folder: str, dtype: torch.dtype) -> str | None:
    """The variant `from_pretrained` should load for a 16-bit model: "fp16" where the folder ships one.

    Reading the fp16 file reads half the bytes of the float32 default and allocates no float32
    copy. diffusers 0.42 does not fall back to the default file when an asked-for variant is
    missing (it logs an error and raises), so the variant is only asked for after this check.
    `folder` is a local folder or a hub id; for a hub id the variant counts as present when it is
    in the local Hugging Face cache or, online, in the repo (it is then downloaded: it is the file
    that will be loaded). For bfloat16 the fp16 values are converted: they are the weights the
    model's authors publish for 16-bit inference.
    """
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if os.path.isdir(folder):
        present = any(os.path.isfile(os.path.join(folder, name)) for name in _FP16_FILES)
    else:
        present = any(_in_hub_repo(folder, name) for name in _FP16_FILES)
    return "fp16" if present else None


def pipeline_fp16_variant(source: str, dtype: torch.dtype, *, component: str = "unet") -> str | None:
    """`fp16_variant` for a whole pipeline (a local folder or a hub id): "fp16" where its
    `component` ships one, that being the largest component the job loads from it (the UNet, or
    the second text encoder when the UNet comes from elsewhere). diffusers loads the variant for
    every component that has it and the default files for the others (checked on diffusers
    0.42.1). Every model card of SDXL and its derivatives loads `variant="fp16"`: the float32
    files are twice the bytes (some 14 GB against 7 GB for SDXL base), read and converted on the
    actor's one CPU thread."""
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return None
    names = (
        _FP16_FILES if component in ("unet", "vae") else ("model.fp16.safetensors", "model.safetensors.index.fp16.json")
    )
    if os.path.isdir(source):
        present = any(os.path.isfile(os.path.join(source, component, name)) for name in names)
    else:
        present = any(_in_hub_repo(source, f"{component}/{name}") for name in names)
    return "fp16" if present else None


def _in_hub_repo(repo_id: str, filename: str) -> bool:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id=repo_id, filename=filename)
    except EntryNotFoundError:  # also LocalEntryNotFoundError: offline (or unreachable) and not cached
        return False
    return True


def is_file_ref(ref: str) -> bool:
    """Whether a weights reference names one file (a checkpoint) rather than a diffusers folder."""
    return ref.rstrip("/").endswith((".safetensors", ".bin", ".pt", ".pth"))


def load_state_dict_file(path: str) -> dict[str, Any]:
    """Tensors of a checkpoint file, all at once. `.bin` files (DMD2 ships one) load with
    `weights_only=True`, which refuses pickled code: a checkpoint can carry tensors, never programs.

    UNet checkpoints do not come through here: `pipeline.models.loading` streams them, one tensor
    at a time, straight into the target dtype and device."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return state


def resolve_weights_file(ref: str, *, storage: StorageConfig | None, cache_dir: Path) -> str:
    """A local file for a weights reference: `hf://ORG/REPO/FILE`, an object-store URI or a path."""
    check_source(ref)
    if ref.startswith("hf://"):
        parts = ref.removeprefix("hf://").split("/")
        if len(parts) < 3:
            raise ModelError(f"{ref!r}: expected hf://ORG/REPO/FILE")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return _hub_file(repo_id, filename)
    if is_remote(ref):
        folder = materialize(cache_dir, f"files/{_key(ref)}", lambda d: _copy_remote(ref, storage, d, single_file=True))
        return str(folder / os.path.basename(ref.rstrip("/")))
    local = ref.removeprefix("file://")
    if not os.path.isfile(local):
        raise ModelError(f"weights file not found: {local}")
    return local


def _hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return str(hf_hub_download(repo_id=repo_id, filename=filename))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{filename} from hub repo {repo_id} is not in the local Hugging Face cache and cannot be downloaded "
            "(offline: HF_HUB_OFFLINE is set or the hub is unreachable); pre-fetch it with "
            f"`huggingface-cli download {repo_id} {filename}` or point the config at a local or s3:// copy"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise ModelError(f"{filename} not found in hub repo {repo_id}: {error}") from None

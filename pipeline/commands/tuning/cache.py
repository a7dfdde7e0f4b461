"""Measured loads, kept so that a rerun of `tune` measures only what is new.

A load's figures depend on the model (preset and weights), what the sample asks of it (sizes,
steps, guidance, negative prompts: its settings mix), the GPU type, the load setting, the batch
settings it sweeps, the search mode and the library versions, and on nothing else: that is the
key. One JSON file per key under the cache folder (`--cache-dir`, default
`~/.cache/sdxl-batch/tune`), written atomically; `--fresh` ignores what is there and overwrites it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.commands.tuning.plan import LoadRequest
from pipeline.commands.tuning.points import OK, Load

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bumped when what a load measures changes


def library_versions() -> dict[str, str]:
    """The versions the figures depend on (this machine's: the cluster runs the same image)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "ray", "sdxl-batch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "?"
    return found


class TuneCache:
    """Loads by key: `common` holds what every key of one `tune` run shares."""

    def __init__(self, folder: Path, common: dict[str, Any], *, fresh: bool = False):
        self.folder = folder
        self.common = {**common, "cache_version": CACHE_VERSION}
        self.fresh = fresh
        self.hits = 0

    def key(self, request: LoadRequest, mode: str) -> str:
        what = {
            **self.common,
            "accelerator_type": request.accelerator_type,
            "load": request.load.to_dict(),
            "batches": request.batches.to_dict(),
            "in_space": request.in_space,
            "mode": mode,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, request: LoadRequest, mode: str) -> Load | None:
        if self.fresh:
            return None
        path = self.folder / f"{self.key(request, mode)}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            load = Load.from_dict(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the cached load %s: %s", path, error)
            return None
        self.hits += 1
        load.cached = True
        load.reference = request.reference
        for point in load.points:
            point.cached = True
        return load

    def put(self, request: LoadRequest, mode: str, load: Load) -> None:
        """Keep a load that ran to its end (a failed one is measured again next time)."""
        if load.status != OK:
            return
        self._write(f"{self.key(request, mode)}.json", json.dumps(load.to_dict()).encode())

    def put_pixels(self, request: LoadRequest, mode: str, pixels: np.ndarray) -> None:
        """A reference's quality pixels: a rerun that serves the reference from the cache judges
        its new loads against them."""
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        self._write(f"{self.key(request, mode)}.npy", buffer.getvalue())

    def pixels(self, request: LoadRequest, mode: str) -> np.ndarray | None:
        path = self.folder / f"{self.key(request, mode)}.npy"
        try:
            return np.asarray(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            return None

    def _write(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, self.folder / name)

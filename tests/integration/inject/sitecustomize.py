"""Test-only fault injection for processes the tests cannot reach directly (Ray's actor workers).

A test puts this folder on PYTHONPATH and sets SDXL_BATCH_TEST_OOM_ABOVE=N; every Python process
started with that environment imports this module at start-up (`site`), and when it imports
`pipeline.models.generator`, `ImageGenerator.generate` raises torch's out-of-memory error for
calls of more than N images, as a GPU without enough memory would. Nothing in `pipeline/` knows.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "pipeline.models.generator"
LIMIT = os.environ.get("SDXL_BATCH_TEST_OOM_ABOVE")


def _patch(module: ModuleType, limit: int) -> None:
    original = module.ImageGenerator.generate

    def generate(self: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        if len(prompts) > limit:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the tests: {len(prompts)} images)")
        return original(self, prompts, *args, **kwargs)

    module.ImageGenerator.generate = generate


class _Injector(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET or LIMIT is None:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module, int(str(LIMIT)))

        loader.exec_module = exec_and_patch
        return spec


if LIMIT is not None:
    sys.meta_path.insert(0, _Injector())

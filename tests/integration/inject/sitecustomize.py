"""Test-only fault injection for processes the tests cannot reach directly (Ray's workers).

A test puts this folder on PYTHONPATH and sets one of the variables below; every Python process
started with that environment imports this module at start-up (`site`), and patches the named
module when it is imported. Nothing in `pipeline/` knows.

- SDXL_BATCH_TEST_OOM_ABOVE=N: `ImageGenerator.generate` raises torch's out-of-memory error for
  calls of more than N images, as a GPU without enough memory would.
- SDXL_BATCH_TEST_SLOW_GENERATE=SECONDS: each `ImageGenerator.generate` call first sleeps SECONDS,
  as on a slow GPU, so that a test can act while batches are rendering (the tiny model renders a
  batch in a fraction of a second).
- SDXL_BATCH_TEST_CORRUPT=KEY=VALUE: `ImageGenerator.generate` inverts the pixels it renders when
  the generator's `model.KEY` is VALUE (e.g. `attention=eager`): a setting that silently breaks the
  images, as a broken kernel would, for `tune`'s quality gate to catch.
- SDXL_BATCH_TEST_CRASH=load|generate|encode: the process kills itself with SIGSEGV in
  `ImageGenerator.load` (a corrupt weight file that segfaults), in `ImageGenerator.generate` (a
  bad driver crashing in the first kernel) or in `encode_batch` (a CPU task's worker dying), as
  native code would: no Python exception, the process is gone.
- SDXL_BATCH_TEST_CRASH_ONCE=PATH (with SDXL_BATCH_TEST_CRASH): crash only the first time,
  across processes (the first crash creates PATH): a transient failure that a retry recovers.
- SDXL_BATCH_TEST_CRASH_LOG=PATH (with SDXL_BATCH_TEST_CRASH): each crash appends a line to PATH,
  so a test can count them (Ray deduplicates the workers' lines on the driver's console).
- SDXL_BATCH_TEST_KILL_AT_COMMIT=N, SDXL_BATCH_TEST_KILL_MARKS=PREFIX: the N-th metadata part of
  the job (counted across processes with the files PREFIX.1, PREFIX.2, ...) is never written: its
  images or tar are, then the driver and the writing worker are killed with SIGKILL, as when the
  whole cluster is preempted between a part's objects and its commit. The first process that
  starts with these variables (the CLI's driver) records its pid for the workers to find.
  With SDXL_BATCH_TEST_KILL_DURING=1 the kill comes in the middle of the metadata part's write:
  on local disk its temporary file holds half the part, as a kill during `write_bytes` leaves.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

LIMIT = os.environ.get("SDXL_BATCH_TEST_OOM_ABOVE")
CRASH = os.environ.get("SDXL_BATCH_TEST_CRASH")
CRASH_ONCE = os.environ.get("SDXL_BATCH_TEST_CRASH_ONCE")
CRASH_LOG = os.environ.get("SDXL_BATCH_TEST_CRASH_LOG")
SLOW = os.environ.get("SDXL_BATCH_TEST_SLOW_GENERATE")
CORRUPT = os.environ.get("SDXL_BATCH_TEST_CORRUPT")


def _crash(where: str) -> None:
    if CRASH_ONCE:
        try:
            os.close(os.open(CRASH_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # crashed once already
    line = f"sdxl-batch tests: injected SIGSEGV in {where} (pid {os.getpid()})\n"
    if CRASH_LOG:
        with open(CRASH_LOG, "a", encoding="utf-8") as log:
            log.write(line)
    sys.stderr.write(line)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSEGV)


def _crashing(where: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        _crash(where)
        return original(*args, **kwargs)

    return call


def _patch_generator(module: ModuleType) -> None:
    if CRASH in ("load", "generate"):
        cls = module.ImageGenerator
        setattr(cls, CRASH, _crashing(f"ImageGenerator.{CRASH}", getattr(cls, CRASH)))
    if SLOW:
        _slow_down(module.ImageGenerator, float(SLOW))
    if CORRUPT:
        _corrupt(module.ImageGenerator, *CORRUPT.split("=", 1))
    if LIMIT is None:
        return
    limit = int(LIMIT)
    original = module.ImageGenerator.generate

    def generate(self: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        if len(prompts) > limit:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the tests: {len(prompts)} images)")
        return original(self, prompts, *args, **kwargs)

    module.ImageGenerator.generate = generate


def _slow_down(cls: Any, seconds: float) -> None:
    original = cls.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    cls.generate = generate


def _corrupt(cls: Any, key: str, value: str) -> None:
    original = cls.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        pixels = original(self, *args, **kwargs)
        if str(getattr(self.model, key)).lower() == value.lower():
            pixels[...] = 255 - pixels  # in place: the array shares the call's output buffer
        return pixels

    cls.generate = generate


def _patch_encoding(module: Any) -> None:
    # Before pipeline.run.stages imports the name.
    module.encode_batch = _crashing("encode_batch", module.encode_batch)


KILL_AT_COMMIT = os.environ.get("SDXL_BATCH_TEST_KILL_AT_COMMIT")
if KILL_AT_COMMIT is not None:
    os.environ.setdefault("SDXL_BATCH_TEST_DRIVER_PID", str(os.getpid()))  # inherited by Ray's processes


def _commit_ordinal() -> int:
    prefix = os.environ["SDXL_BATCH_TEST_KILL_MARKS"]
    n = 1
    while True:
        try:
            os.close(os.open(f"{prefix}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _patch_writer(module: ModuleType) -> None:
    original = module.write_bytes

    def write_bytes(fs: Any, path: str, data: bytes) -> None:
        if "/metadata/part-" in path and _commit_ordinal() == int(KILL_AT_COMMIT or 0):
            sys.stderr.write(f"sdxl-batch tests: killing the job before committing {path}\n")
            sys.stderr.flush()
            from pipeline.core.io import is_remote_fs, temporary_path

            if os.environ.get("SDXL_BATCH_TEST_KILL_DURING") and not is_remote_fs(fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(temporary_path(path), "wb") as half:
                    half.write(data[: len(data) // 2])
            os.kill(int(os.environ["SDXL_BATCH_TEST_DRIVER_PID"]), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        original(fs, path, data)

    module.write_bytes = write_bytes  # type: ignore[attr-defined]


PATCHES: dict[str, Callable[[ModuleType], None]] = {}
if KILL_AT_COMMIT is not None:
    PATCHES["pipeline.output.writer"] = _patch_writer
if LIMIT is not None or CRASH in ("load", "generate") or SLOW or CORRUPT:
    PATCHES["pipeline.models.generator"] = _patch_generator
if CRASH == "encode":
    PATCHES["pipeline.run.encoding"] = _patch_encoding


class _Injector(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        patch = PATCHES.pop(name, None)
        if patch is None:
            return None
        if not PATCHES:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # no longer ours to find: the name is popped
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch
        return spec


if PATCHES:
    sys.meta_path.insert(0, _Injector())

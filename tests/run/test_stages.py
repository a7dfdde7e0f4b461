"""The generator stage outside Ray: every torch call of an actor runs on one thread of its own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.config import JobConfig
from pipeline.core.errors import SdxlBatchError
from pipeline.core.render import RenderSettings
from pipeline.models.generator import ImageGenerator
from pipeline.run import stages
from pipeline.run.builder import generator_kwargs


def test_load_and_every_batch_run_on_the_same_thread(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray constructs an actor on the process's main thread and runs its batches on an executor
    # thread. OpenMP keeps one thread team per calling thread; two teams on the same cores make
    # its workers sleep between parallel regions. So the stage pins torch to a thread of its own.
    threads: dict[str, set[int]] = {"load": set(), "render": set(), "tokens": set()}
    original_load, original_render, original_tokens = (
        ImageGenerator.load,
        ImageGenerator.render,
        ImageGenerator.token_counts,
    )

    def record(name: str, method: Any) -> Any:
        def wrapper(self: ImageGenerator, *args: Any, **kwargs: Any) -> Any:
            threads[name].add(threading.get_ident())
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(ImageGenerator, "load", record("load", original_load))
    monkeypatch.setattr(ImageGenerator, "render", record("render", original_render))
    monkeypatch.setattr(ImageGenerator, "token_counts", record("tokens", original_tokens))
    monkeypatch.setattr(stages, "_placement", lambda **_: ("node", "actor", "", "CPU"))
    config = JobConfig.model_validate({
        "manifest": str(tmp_path / "m.parquet"),
        "output": str(tmp_path / "out"),
        "model": {"preset": "tiny", "cache_dir": str(model_cache), "device": "cpu"},  # a CPU actor, as placed
        "resources": {"torch_threads": 1},
    })  # fmt: skip
    stage = stages.GenerateImages(**generator_kwargs(config))
    batch = pa.table({
        "id": ["a", "b"],
        "prompt": ["a red car", "a blue fish"],
        "negative_prompt": pa.array([None, None], pa.string()),
        "seed": [1, 2],
        "width": [64, 64],
        "height": [64, 64],
        "steps": [2, 2],
        "guidance_scale": [0.0, 0.0],
    })  # fmt: skip
    # Two batches from two other threads, as Ray may hand them over.
    with ThreadPoolExecutor(max_workers=2) as callers:
        outputs = [callers.submit(stage, batch).result() for _ in range(2)]

    (torch_thread,) = threads["load"]
    assert threads["render"] == {torch_thread} and threads["tokens"] == {torch_thread}
    assert torch_thread != threading.get_ident()
    first, second = (np.frombuffer(b"".join(o.column("pixels").to_pylist()), np.uint8) for o in outputs)
    assert first.size == 2 * 64 * 64 * 3 and np.array_equal(first, second)


def test_a_load_error_reaches_the_first_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "_placement", lambda **_: ("node", "actor", "", "CPU"))
    config = JobConfig.model_validate({
        "manifest": str(tmp_path / "m.parquet"),
        "output": str(tmp_path / "out"),
        "model": {"preset": "tiny", "path": str(tmp_path / "no-such-model"), "cache_dir": str(tmp_path / "cache")},
    })  # fmt: skip
    stage = stages.GenerateImages(**generator_kwargs(config))  # the constructor itself does not fail
    with pytest.raises(SdxlBatchError, match="no-such-model"):
        stage(pa.table({"id": ["a"]}))


def test_mixed_settings_share_one_pixel_buffer(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of different sizes in one batch: grouped next to each other, rendered into one host
    buffer that Arrow takes without a copy, each row's pixels those of its own render."""
    monkeypatch.setattr(stages, "_placement", lambda **_: ("node", "actor", "", "CPU"))
    config = JobConfig.model_validate({
        "manifest": str(tmp_path / "m.parquet"),
        "output": str(tmp_path / "out"),
        "model": {"preset": "tiny", "cache_dir": str(model_cache), "device": "cpu"},  # a CPU actor, as placed
        "generation": {"batch_size": 3},
    })  # fmt: skip
    stage = stages.GenerateImages(**generator_kwargs(config))
    sizes = [64, 32, 64]
    batch = pa.table({
        "id": ["a", "b", "c"],
        "prompt": ["a red car", "a blue fish", "a dog"],
        "negative_prompt": pa.array([None] * 3, pa.string()),
        "seed": [1, 2, 3],
        "width": sizes,
        "height": sizes,
        "steps": [2] * 3,
        "guidance_scale": [0.0] * 3,
    })  # fmt: skip
    out = stage(batch)
    assert out.column("id").to_pylist() == ["a", "c", "b"]  # the two 64x64 rows are one model call
    column = out.column("pixels")
    assert column.num_chunks == 1 and len(column.chunk(0).buffers()[2]) == (2 * 64 * 64 + 32 * 32) * 3
    assert out.column("render_batch_size").to_pylist() == [2, 2, 1]
    generator = stage.generator
    for row in out.to_pylist():
        size = row["width"]
        expected = generator.generate([row["prompt"]], [None], [row["seed"]], RenderSettings(size, size, 2, 0.0))[0]
        got = np.frombuffer(row["pixels"], np.uint8).reshape(size, size, 3)
        assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 2

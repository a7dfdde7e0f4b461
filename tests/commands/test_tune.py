"""The sweep, the best-config document and the time/cost arithmetic of tune and estimate."""

from __future__ import annotations

import pytest

from pipeline.commands.tune import Estimate, SweepSpace, Trial, best_config_document, cost_per_1000
from pipeline.core.config import build_config
from pipeline.core.errors import ConfigError


def _config(**resources: object):  # type: ignore[no-untyped-def]
    return build_config(
        {
            "manifest": "m.parquet", "output": "out", "resources": resources,
            "storage": {"key": "AKIAFAKEKEY000000001", "secret": "not-to-be-copied"},
            "generation": {"batch_size": 2},
        },
        source="test",
    )  # fmt: skip


def test_sweep_defaults_on_gpu_and_cpu() -> None:
    gpu = SweepSpace.parse(_config(actors=4, gpus_per_actor=1))
    assert gpu.batch_sizes == [1, 2, 4, 8] and gpu.actors_per_gpu == [1, 2]
    assert gpu.dtypes == ["float16", "bfloat16"] and gpu.compile == [False, True]
    assert len(gpu.trials()) == 4 * 2 * 2 * 2
    cpu = SweepSpace.parse(_config(), batch_sizes="4, 1,4", dtypes="fp32,bf16", compile="off")
    assert cpu.batch_sizes == [4, 1] and cpu.dtypes == ["float32", "bfloat16"] and cpu.compile == [False]
    assert [t.name for t in cpu.trials()][:2] == ["b4-a1-float32-eager", "b1-a1-float32-eager"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"batch_sizes": "2,0"}, "--batch-sizes: cannot read '0'"),
        ({"batch_sizes": "two"}, "--batch-sizes: cannot read 'two'"),
        ({"dtypes": "fp8"}, "--dtypes: cannot read 'fp8'"),
        ({"compile": "maybe"}, "--compile: cannot read 'maybe'"),
        ({"actors_per_gpu": ","}, "--actors-per-gpu: no values given"),
        ({"dtypes": "fp16"}, "float16 needs a GPU"),
    ],
)
def test_bad_sweep_values_are_named(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SweepSpace.parse(_config(), **flags)


def test_a_trial_runs_on_one_gpu_and_the_best_config_scales_to_the_job() -> None:
    config = _config(actors=4, gpus_per_actor=1)
    trial = Trial(batch_size=8, actors_per_gpu=2, dtype="bfloat16", compile=True)
    applied = trial.apply(config)
    assert (applied.resources.actors, applied.resources.gpus_per_actor) == (2, 0.5)
    assert applied.generation.batch_size == 8 and applied.model.dtype == "bfloat16" and applied.model.compile
    document = best_config_document(config, trial)
    assert document["resources"]["actors"] == 8 and document["resources"]["gpus_per_actor"] == 0.5
    assert document["generation"]["batch_size"] == 8 and document["model"]["compile"] is True
    assert "key" not in document["storage"] and "secret" not in document["storage"]
    assert build_config(document, source="best").resources.actors == 8  # a valid config


def test_cost_and_estimate_arithmetic() -> None:
    assert cost_per_1000(images_per_second=2.0, price=3.6) == pytest.approx(0.5)  # 500 s of a 3.6/h GPU
    assert cost_per_1000(2.0, None) is None and cost_per_1000(0.0, 1.0) is None
    estimate = Estimate(
        rows=36_000, images_per_second=4.0, startup_seconds=60, gpus=4, device="gpu", price=2.0, source="x"
    )
    assert estimate.seconds == pytest.approx(60 + 9000)
    assert estimate.unit_hours == pytest.approx(9060 / 3600 * 4)
    assert estimate.cost == pytest.approx(9060 / 3600 * 4 * 2.0)
    text = "\n".join(estimate.lines())
    assert "2.5 h on 4 GPU(s)" in text and "per GPU-hour" in text

"""A mixed fleet without a cluster: GPU types from Ray's node table, the fleet's placement, one
precision for the job, the actors' slots, the builder's stage, the fingerprint and the actor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.core.accelerators import resolve_auto_dtype, supports_bf16
from pipeline.core.config import JobConfig, build_config
from pipeline.core.errors import ConfigError, PlacementError
from pipeline.plan.ledger import check_fingerprint, recorded_fingerprint, settings_fingerprint
from pipeline.run import stages
from pipeline.run.builder import GeneratorPool, ModelActors, encode_concurrency, generator_kwargs
from pipeline.run.fleet import FleetSlots, GpuType, cluster_gpu_types, resolve_fleet, resolve_precision
from pipeline.run.nodes import fits


def _node(node: str, gpus: float, cpus: float, kind: str | None = None, *, alive: bool = True,
          label: str | None = None) -> dict[str, Any]:  # fmt: skip
    resources: dict[str, float] = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    return {"NodeID": node, "Alive": alive, "Resources": resources,
            "Labels": {"ray.io/accelerator-type": label} if label else {}}  # fmt: skip


def _config(**data: Any) -> JobConfig:
    return build_config({"manifest": "m.parquet", "output": "out", **data}, source="test")


def test_the_clusters_gpu_types_from_its_nodes() -> None:
    nodes = [
        _node("head", 0, 8),
        _node("a1", 8, 96, "A10G"), _node("a2", 4, 32, "A10G"),
        _node("h1", 8, 208, "H100"), _node("h2", 8, 208, "H100", alive=False),
        _node("l1", 1, 4, label="L4"), _node("x", 2, 16),
    ]  # fmt: skip
    types = cluster_gpu_types(nodes)
    assert types == {
        "A10G": GpuType("A10G", 12, 2, 8.0),  # the leaner node's CPUs per GPU
        "GPU": GpuType("GPU", 2, 1, 8.0),  # a GPU node naming no type
        "H100": GpuType("H100", 8, 1, 26.0),
        "L4": GpuType("L4", 1, 1, 4.0),  # named by a node label
    }
    assert cluster_gpu_types([_node("cpu", 0, 2)]) == {}


def test_a_fleet_takes_each_types_gpus_and_leaves_out_a_type_the_cluster_lacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(fleet={"A10G": {"batch_size": 4}, "H100": {"batch_size": 16, "actors_per_gpu": 2},
                            "T4": {"batch_size": 2}})  # fmt: skip
    types = {"A10G": GpuType("A10G", 16, 4, 8.0), "H100": GpuType("H100", 8, 1, 26.0)}
    with caplog.at_level(logging.WARNING, logger="pipeline.run.fleet"):
        resolved = resolve_fleet(config, types)
    assert "the fleet lists T4, which this cluster has no GPUs of" in caplog.text
    assert {name: t.gpus for name, t in resolved.fleet.items()} == {"A10G": 16, "H100": 8}
    assert resolved.resources.actors == 16 + 8 * 2 and resolved.resources.gpus_per_actor == 0.5
    assert resolved.batch_sizes == [4, 16]
    planned = resolve_fleet(_config(fleet={"T4": {"batch_size": 2, "gpus": 4}}), types)  # an autoscaler adds them
    assert planned.resources.actors == 4
    with pytest.raises(PlacementError, match=r"none of the fleet's GPU types \(T4\) is in the cluster"):
        resolve_fleet(_config(fleet={"T4": {"batch_size": 2}}), types)


def test_a_fleet_section_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"remove resources\.actors"):
        _config(fleet={"A10G": {"batch_size": 4}}, resources={"actors": 2})
    with pytest.raises(ConfigError, match="fleet keys are Ray accelerator types"):
        _config(fleet={"CPU": {"batch_size": 4}})
    with pytest.raises(ConfigError, match=r"fleet.A10G.batch_size: required"):
        _config(fleet={"A10G": {"actors_per_gpu": 2}})


def test_dtype_auto_is_one_precision_for_every_gpu_of_the_job(caplog: pytest.LogCaptureFixture) -> None:
    assert supports_bf16("H100") and supports_bf16("a10g") and supports_bf16("T4") is False
    assert supports_bf16("GPU_A") is None
    assert resolve_auto_dtype(["A10G", "H100"], on_gpu=True)[0] == "bfloat16"
    dtype, why = resolve_auto_dtype(["A10G", "T4"], on_gpu=True)
    assert dtype == "float16" and "T4 lack bfloat16" in why
    assert resolve_auto_dtype([], on_gpu=False)[0] == "float32"
    assert resolve_auto_dtype(["GPU_A"], on_gpu=True)[0] == "auto"  # unknown: each actor picks
    types = {"A10G": GpuType("A10G", 1, 1, 8.0), "T4": GpuType("T4", 1, 1, 8.0)}
    mixed = _config(resources={"gpus_per_actor": 1})
    resolved, why = resolve_precision(mixed, types)
    assert resolved.model.dtype == "float16" and "T4" in why
    # The fleet's types decide, not the cluster's; an explicit dtype is kept.
    fleet = _config(fleet={"A10G": {"batch_size": 4}}).model_copy(
        update={"resources": mixed.resources}
    )  # fmt: skip
    assert resolve_precision(fleet, types)[0].model.dtype == "bfloat16"
    assert resolve_precision(_config(model={"dtype": "float32"}, resources={"gpus_per_actor": 1}), types)[1] == ""
    with caplog.at_level(logging.WARNING, logger="pipeline.run.fleet"):
        kept, _ = resolve_precision(mixed, {"GPU_A": GpuType("GPU_A", 1, 1, 2.0)})
    assert kept.model.dtype == "auto" and "set model.dtype to pin one precision" in caplog.text


def test_each_actor_of_the_pool_gets_the_next_slot_of_the_type_furthest_behind() -> None:
    config = _config(fleet={"A10G": {"batch_size": 4, "gpus": 2}, "H100": {"batch_size": 16, "actors_per_gpu": 2,
                                                                            "gpus": 1}})  # fmt: skip
    slots = FleetSlots(dict(config.fleet))
    given = [slots() for _ in range(4)]
    assert sorted(str(g["resources"]) for g in given) == sorted(
        ["{'accelerator_type:A10G': 0.001}"] * 2 + ["{'accelerator_type:H100': 0.001}"] * 2
    )
    assert {g["num_gpus"] for g in given if "accelerator_type:H100" in g["resources"]} == {0.5}
    assert {g["num_gpus"] for g in given if "accelerator_type:A10G" in g["resources"]} == {1.0}


def test_the_fleets_generate_stage_and_encode_cap() -> None:
    types = {"A10G": GpuType("A10G", 2, 1, 8.0), "H100": GpuType("H100", 1, 1, 26.0)}
    config = resolve_fleet(
        _config(fleet={"A10G": {"batch_size": 4, "encode_cpus_per_gpu": 2}, "H100": {"batch_size": 16,
                                                                                    "encode_cpus_per_gpu": 6}}),
        types,
    )  # fmt: skip
    args = GeneratorPool().map_args(config)
    assert args["batch_size"] == 16 and isinstance(args["ray_remote_args_fn"], FleetSlots)
    assert args["compute"].min_size == args["compute"].max_size == 3
    assert generator_kwargs(config)["fleet"] == dict(config.fleet)
    assert encode_concurrency(config) == round((2 * 2 + 6) / 0.5)
    assert encode_concurrency(_config()) is None
    remote = ModelActors(["actor"], token="t").map_args(config)  # type: ignore[list-item]
    assert remote["compute"].min_size == 1 and remote["num_cpus"] == 0 and remote["max_restarts"] == 0


def test_a_node_fits_a_fleet_actor_only_when_it_is_of_a_fleet_type() -> None:
    a10g, other = _node("a", 1, 8, "A10G"), _node("b", 1, 8, "L4")
    assert fits(a10g, gpus=1, cpus=1, types=frozenset({"A10G"}))
    assert not fits(other, gpus=1, cpus=1, types=frozenset({"A10G"}))
    assert fits(other, gpus=1, cpus=1)


def test_the_fingerprint_holds_what_changes_pixels_and_compares_what_both_records_have() -> None:
    bf16 = settings_fingerprint(_config(model={"dtype": "bfloat16"}))
    fp16 = settings_fingerprint(_config(model={"dtype": "float16", "preset": "lightning-4step"}))
    assert bf16["settings"]["vae"] == "tiny/vae" and fp16["settings"]["vae"] == "madebyollin/sdxl-vae-fp16-fix"
    assert {"model.dtype", "model.attention", "model.compile", "model.fuse_qkv"} <= set(bf16["settings"])
    fp32 = settings_fingerprint(_config(model={"dtype": "float32"}))
    with pytest.raises(ConfigError, match=r"model.dtype: 'bfloat16' -> 'float32'.*\(model.dtype auto: because\)"):
        check_fingerprint(bf16, fp32, "out", resolved="because")
    auto = settings_fingerprint(_config())
    check_fingerprint(bf16, auto, "out")  # not resolved yet (validate): checked once the GPUs are known
    older = {"digest": "x", "settings": {k: v for k, v in bf16["settings"].items() if not k.startswith("model.d")}}
    check_fingerprint(older, fp32, "out")  # a record of an earlier version lacks the key: not a change
    kept = recorded_fingerprint(bf16, auto)
    assert kept["settings"]["model.dtype"] == "bfloat16" and kept["settings"]["vae"] == "tiny/vae"
    assert recorded_fingerprint(None, auto) == auto


def test_a_fleet_actor_takes_its_types_batch_size_and_switches_and_records_what_rendered(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stages, "_placement", lambda **_: ("node", "actor", "gpu0", "H100"))
    config = _config(
        model={"preset": "tiny", "cache_dir": str(model_cache), "dtype": "float32"},
        generation={"width": 64, "height": 64},
        fleet={"A10G": {"batch_size": 1}, "H100": {"batch_size": 3, "vae_batch_size": 2}},
    )
    stage = stages.GenerateImages(**generator_kwargs(config))
    assert stage.load_error is None and stage.generator.batch_size == 3 and stage.generator.model.vae_batch_size == 2
    rows = pa.table({
        "id": [f"r{i}" for i in range(5)], "prompt": ["a red bicycle"] * 5, "negative_prompt": [None] * 5,
        "seed": list(range(5)), "width": [64] * 5, "height": [64] * 5, "steps": [2] * 5, "guidance_scale": [0.0] * 5,
    })  # fmt: skip
    out = stage(rows)
    assert out.column("render_batch_size").to_pylist() == [3, 3, 3, 2, 2]  # Ray Data's block, in calls of 3
    assert set(out.column("accelerator_type").to_pylist()) == {"H100"}
    assert set(out.column("dtype").to_pylist()) == {"float32"} and set(out.column("vae").to_pylist()) == {"tiny/vae"}
    assert set(out.column("attention").to_pylist()) == {"sdpa"}
    monkeypatch.setattr(stages, "_placement", lambda **_: ("node", "actor", "gpu0", "L4"))
    stray = stages.GenerateImages(**generator_kwargs(config))
    with pytest.raises(Exception, match="placed on a L4 GPU, which the job's fleet section does not list"):
        stray(rows)

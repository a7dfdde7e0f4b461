from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.core.config import JobConfig
from pipeline.run.builder import build_dataset


class RecordedGraph:
    """Stands in for a Ray dataset: records each stage's map_batches arguments."""

    def __init__(self) -> None:
        from ray.data import DataContext

        self.stages: list[tuple[str, dict[str, Any]]] = []
        self.context = DataContext()

    def map_batches(self, fn: Any, **kwargs: Any) -> RecordedGraph:
        self.stages.append((getattr(fn, "__name__", type(fn).__name__), kwargs))
        return self

    def repartition(self, **kwargs: Any) -> RecordedGraph:
        self.stages.append(("repartition", kwargs))
        self._logical_plan = SimpleNamespace(dag=None)  # see test_the_read_and_the_cut_into_slices_...
        return self


@pytest.mark.parametrize("max_retries", [None, 0, 5])
def test_every_stage_bounds_the_restarts_and_retries_of_its_dead_workers(
    max_retries: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.data

    graph = RecordedGraph()
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kwargs: graph)
    resources: dict[str, Any] = {"actors": 2, "gpus_per_actor": 1}
    if max_retries is not None:
        resources["max_retries"] = max_retries
    config = JobConfig.model_validate({"manifest": "m.parquet", "output": "out", "resources": resources})
    build_dataset(config, [], masks={}, slice_rows=64)

    bound = 2 if max_retries is None else max_retries  # a small default: Ray Data's is unbounded (-1)
    names = [name for name, _ in graph.stages]
    assert names == ["ReadManifest", "repartition", "GenerateImages", "EncodeImages", "WriteParts"]
    assert graph.stages[1][1] == {"target_num_rows_per_block": 64}  # the generators' slices
    stages = dict(graph.stages)
    assert stages["GenerateImages"]["max_restarts"] == bound
    # Its batches wait for the restarts: a lost node's seconds of "actor unavailable" use no bound up.
    assert stages["GenerateImages"]["max_task_retries"] == -1
    assert "max_retries" not in stages["GenerateImages"]  # an actor option Ray would reject
    for task in ("ReadManifest", "EncodeImages", "WriteParts"):
        assert stages[task]["max_retries"] == bound and "max_restarts" not in stages[task]


def test_ray_constructs_the_generator_from_what_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray builds each generator actor from `fn_constructor_kwargs`, in the actor's process: the
    keywords must be the constructor's own, and nothing more of the job's config travels."""
    import inspect

    import ray.data

    from pipeline.run.stages import GenerateImages

    graph = RecordedGraph()
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kwargs: graph)
    config = JobConfig.model_validate({"manifest": "m.parquet", "output": "s3://bucket/jobs/out/"})
    build_dataset(config, [], masks={}, slice_rows=64)
    kwargs = dict(graph.stages)["GenerateImages"]["fn_constructor_kwargs"]
    # Every keyword but `in_process`, which only a job run in the driver's process sets.
    assert set(kwargs) == set(inspect.signature(GenerateImages).parameters) - {"in_process"}
    assert kwargs["model"] == config.model and kwargs["batch_size"] == config.generation.batch_size
    assert kwargs["job"] == "out"


def test_the_graph_runs_with_a_watch_on_the_nodes_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node watch (`run.nodes`) goes into the dataset's own DataContext, not the process's."""
    import ray.data

    graph = RecordedGraph()
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kwargs: graph)
    config = JobConfig.model_validate({"manifest": "m.parquet", "output": "out", "resources": {"gpus_per_actor": 1}})
    build_dataset(config, [], masks={}, slice_rows=64)
    [watch] = graph.context.custom_execution_callback_classes
    assert watch.__name__ == "NodeWatch"
    assert not ray.data.DataContext.get_current().custom_execution_callback_classes


def test_the_read_and_the_cut_into_slices_run_as_one_task_in_the_plan_ray_runs() -> None:
    """The builder's real graph, planned by Ray: the repartition into slices fuses into the read
    tasks (Ray 2.60's `repartition()` takes no remote args, its tasks would take a whole CPU, and
    a stage of its own is one more the light stages' CPUs must cover: builder.LIGHT_STAGE_CPUS)."""
    import ray
    from ray.data._internal.logical.operators import StreamingRepartition
    from ray.data._internal.logical.optimizers import get_execution_plan

    from pipeline.run.builder import READ_CPUS

    config = JobConfig.model_validate({"manifest": "m.parquet", "output": "out", "resources": {"max_retries": 3}})
    started = not ray.is_initialized()
    try:
        dataset = build_dataset(config, [{"file": 0}], masks={}, slice_rows=64)
        operator = dataset._logical_plan.dag
        while not isinstance(operator, StreamingRepartition):
            [operator] = operator.input_dependencies
        assert operator.target_num_rows_per_block == 64
        assert operator.ray_remote_args == {"num_cpus": READ_CPUS, "max_retries": 3}
        physical, _ = get_execution_plan(dataset._logical_plan)
    finally:
        if started:  # from_items put its rows in an object store of its own making
            ray.shutdown()
    names, stage = [], physical.dag
    while stage.input_dependencies:
        names.append(stage.name)
        [stage] = stage.input_dependencies
    assert names[::-1] == [
        "MapBatches(ReadManifest)->StreamingRepartition[num_rows_per_block=64,strict=False]",
        "MapBatches(GenerateImages)",
        "MapBatches(EncodeImages)",
        "MapBatches(WriteParts)",
    ]

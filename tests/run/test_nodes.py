from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.config import ResourcesConfig
from pipeline.core.errors import PlacementError
from pipeline.run import nodes
from pipeline.run.nodes import fits, node_watch


def _node(node_id: str, *, alive: bool = True, gpus: float = 1.0, cpus: float = 8.0) -> dict[str, Any]:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_a_node_fits_an_actor_when_it_is_alive_and_large_enough() -> None:
    assert fits(_node("a"), gpus=1, cpus=1)
    assert fits(_node("a", gpus=0.5), gpus=0.5, cpus=1)  # two actors share a GPU
    assert not fits(_node("a", alive=False), gpus=1, cpus=1)
    assert not fits(_node("a", gpus=0.5), gpus=1, cpus=1)
    assert not fits(_node("a", cpus=2), gpus=1, cpus=4)
    assert not fits(_node("head", gpus=0), gpus=1, cpus=1)
    assert fits(_node("head", gpus=0), gpus=0, cpus=1)  # a CPU job runs anywhere


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_stops_the_job_once_no_node_has_fitted_for_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    cluster = [_node("head", gpus=0), _node("gpu-a"), _node("gpu-b")]
    monkeypatch.setattr(ray, "nodes", lambda: cluster)
    clock = Clock()
    watch = node_watch(ResourcesConfig(gpus_per_actor=1, wait_for_nodes_s=30), clock=clock)()

    def step(after: float) -> None:
        clock.now += after
        watch.on_execution_step(executor=None)

    step(0)
    cluster[1]["Alive"] = cluster[2]["Alive"] = False  # both GPU nodes lost
    step(nodes.POLL_SECONDS)  # the wait starts here
    step(29)
    cluster.append(_node("gpu-c"))  # a node joins in time: the wait starts over
    step(nodes.POLL_SECONDS)
    cluster[3]["Alive"] = False
    step(nodes.POLL_SECONDS)
    step(29)
    with pytest.raises(PlacementError) as stopped:
        step(nodes.POLL_SECONDS)
    message = str(stopped.value)
    assert message.startswith("no node of the cluster can run a generator actor (1 GPU and 1 CPU) for 31 s")
    assert "the 3 that could are gone (gpu-a, gpu-b, gpu-c) and none has joined since" in message
    assert "resources.wait_for_nodes_s" in message and "rerun the same command" in message


def test_the_watch_asks_the_cluster_at_most_once_per_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls: list[int] = []

    def asked() -> list[dict[str, Any]]:
        calls.append(1)
        return [_node("gpu")]

    monkeypatch.setattr(ray, "nodes", asked)
    clock = Clock()
    watch = node_watch(ResourcesConfig(gpus_per_actor=1), clock=clock)()
    for _ in range(100):  # Ray Data's scheduling loop steps every few milliseconds
        clock.now += 0.01
        watch.on_execution_step(executor=None)
    assert len(calls) == 1

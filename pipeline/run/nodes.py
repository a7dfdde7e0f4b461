"""Lost nodes: how long a job waits for a node that can run its generator actors.

When a node is lost (preempted, its raylet killed), Ray restarts the generator actor that lived
there on another node, and the batches it held wait for it (`builder.retry_bounds`); the actors
left take the rest of the work, and once the queue is empty Ray Data lets an idle one go, which
frees its GPU for the restart. What Ray does not bound is the wait when no node of the cluster
can run a generator actor at all: every GPU node lost and none added back (or none added yet by
an autoscaler). Ray Core then queues the actor until resources appear and Ray Data waits for its
batches, for ever. `NodeWatch` runs in Ray Data's scheduling loop and stops the job with a
`PlacementError` once that has lasted `resources.wait_for_nodes_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import PlacementError
from pipeline.run.fleet import node_type

if TYPE_CHECKING:
    import ray.data

    from pipeline.core.config import ResourcesConfig

POLL_SECONDS = 2.0  # one GCS call per poll, from Ray Data's scheduling loop


def fits(node: dict[str, Any], *, gpus: float, cpus: float, types: frozenset[str] = frozenset()) -> bool:
    """Whether `node` (an entry of `ray.nodes()`) is alive and large enough for one actor, and,
    for a fleet job (`types`: its GPU types), of one of its types."""
    total = node.get("Resources") or {}
    if types and node_type(node) not in types:
        return False
    return bool(node.get("Alive")) and total.get("GPU", 0.0) + 1e-9 >= gpus and total.get("CPU", 0.0) + 1e-9 >= cpus


def placement_error(gone: list[str], *, gpus: float, cpus: float, waited: float) -> PlacementError:
    """Our error, naming the nodes that ran generator actors in this job and are gone."""
    needs = f"{gpus:g} GPU and {cpus:g} CPU" if gpus else f"{cpus:g} CPU"
    history = "none that can has joined"
    if gone:
        ids = ", ".join(sorted(node[:12] for node in gone))
        history = f"the {len(gone)} that could are gone ({ids}) and none has joined since"
    return PlacementError(
        f"no node of the cluster can run a generator actor ({needs}) for {waited:.0f} s "
        f"(resources.wait_for_nodes_s): {history}. The committed parts are kept: rerun the same command once the "
        "cluster has such a node (an autoscaler adds one, or `ray start` on a new machine), or with "
        "resources.gpus_per_actor / cpus_per_actor that fit the nodes it has."
    )


def node_watch(
    resources: ResourcesConfig, *, types: frozenset[str] = frozenset(), clock: Callable[[], float] = time.monotonic
) -> type:
    """A Ray Data execution callback class for these (resolved) resources (and a fleet's GPU
    `types`): Ray Data makes one, without arguments, for each execution of the dataset."""
    import ray
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    gpus, cpus, limit = resources.gpus_per_actor or 0.0, resources.cpus_per_actor, resources.wait_for_nodes_s

    class NodeWatch(ExecutionCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.since: float | None = None  # since when no node fits
            self.next_poll = 0.0
            self.fitted: set[str] = set()  # the nodes that could run an actor, seen alive

        def on_execution_step(self, executor: Any) -> None:
            now = clock()
            if now < self.next_poll:
                return
            self.next_poll = now + POLL_SECONDS
            fitting = {node["NodeID"] for node in ray.nodes() if fits(node, gpus=gpus, cpus=cpus, types=types)}
            self.fitted |= fitting
            if fitting:
                self.since = None
                return
            self.since = now if self.since is None else self.since
            if now - self.since >= limit:
                # Raised in the scheduling loop, it stops the execution and reaches the driver as it is.
                raise placement_error(sorted(self.fitted), gpus=gpus, cpus=cpus, waited=now - self.since)

    return NodeWatch


def watch_nodes(dataset: ray.data.Dataset, resources: ResourcesConfig, types: frozenset[str] = frozenset()) -> None:
    """Run `NodeWatch` while `dataset` executes (its own DataContext: no other dataset sees it)."""
    context = dataset.context
    watch = node_watch(resources, types=types)
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, watch]

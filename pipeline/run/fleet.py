"""The GPU types of a cluster, and one job over a mixed fleet of them.

Ray names each GPU node's type with a resource, `accelerator_type:<T>` (`core.accelerators`), or
a node label where the cluster sets labels. A job with a `fleet:` section runs one actor pool over
the GPUs of the listed types: Ray Data starts each actor with the resources of the next type
still short of its actors (`FleetSlots`, its `ray_remote_args_fn`: the type's share of a GPU and
a sliver of its `accelerator_type` resource, which pins the actor to a node of that type), and
each actor takes its type's batch size and switches (`stages.GenerateImages`). Work flows to
whichever actor is free, so faster GPUs render more rows; nothing splits the manifest up front.

What changes pixels stays one setting for the whole job: `model.dtype: auto` is resolved here,
once, from every GPU type the job runs on (`resolve_precision`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.accelerators import RESOURCE_PREFIX, resolve_auto_dtype, type_of_resources
from pipeline.core.errors import PlacementError

if TYPE_CHECKING:
    from pipeline.core.config import FleetTypeConfig, JobConfig

logger = logging.getLogger(__name__)

# The label Ray sets on a node for its accelerator type (where nodes are started with labels).
ACCELERATOR_LABEL = "ray.io/accelerator-type"
# What each actor asks of its type's resource: enough to pin it to a node of that type (every such
# node has 1), little enough that any number of actors fit there.
TYPE_SHARE = 0.001
UNTYPED = "GPU"  # GPU nodes that name no type


@dataclass(frozen=True)
class GpuType:
    """The GPUs of one accelerator type in a cluster."""

    name: str
    gpus: int
    nodes: int
    cpus_per_gpu: float  # CPUs per GPU on its leanest node: what one GPU's actors and stages get in a job

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "nodes": self.nodes, "cpus_per_gpu": self.cpus_per_gpu}


def node_type(node: dict[str, Any]) -> str:
    """A node's accelerator type (an entry of `ray.nodes()`): its resource, else its label."""
    named = type_of_resources(node.get("Resources") or {})
    return named or (node.get("Labels") or {}).get(ACCELERATOR_LABEL) or UNTYPED


def cluster_gpu_types(nodes: list[dict[str, Any]] | None = None) -> dict[str, GpuType]:
    """The alive GPU nodes of the cluster Ray is connected to, by type (`nodes`: `ray.nodes()`)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    gpus: Counter[str] = Counter()
    count: Counter[str] = Counter()
    cpus: dict[str, float] = {}
    for node in nodes:
        resources = node.get("Resources") or {}
        node_gpus = int(resources.get("GPU", 0.0) + 1e-9)
        if not node.get("Alive") or node_gpus < 1:
            continue
        name = node_type(node)
        gpus[name] += node_gpus
        count[name] += 1
        per_gpu = float(resources.get("CPU", 0.0)) / node_gpus
        cpus[name] = min(cpus.get(name, per_gpu), per_gpu)
    return {name: GpuType(name, gpus[name], count[name], round(cpus[name], 3)) for name in sorted(gpus)}


def resolve_fleet(config: JobConfig, types: dict[str, GpuType]) -> JobConfig:
    """A fleet job's placement: each type's GPUs (its `gpus`, else every GPU of that type the
    cluster has now), the actor count they add up to, and the smallest share of a GPU an actor
    takes. A type the cluster has none of (and no `gpus` for) is left out with a warning."""
    fleet: dict[str, FleetTypeConfig] = {}
    for name, settings in config.fleet.items():
        gpus = settings.gpus or (types[name].gpus if name in types else 0)
        if not gpus:
            logger.warning(
                "the fleet lists %s, which this cluster has no GPUs of: left out of the job (set fleet.%s.gpus "
                "when an autoscaler adds them)",
                name,
                name,
            )
            continue
        fleet[name] = settings.model_copy(update={"gpus": gpus})
    if not fleet:
        have = ", ".join(f"{t.gpus} {name}" for name, t in types.items()) or "no GPUs"
        raise PlacementError(
            f"none of the fleet's GPU types ({', '.join(config.fleet)}) is in the cluster, which has {have}: "
            "list the cluster's types in the fleet section (`sdxl-batch tune` writes it), or set fleet.<type>.gpus "
            "for types an autoscaler adds"
        )
    actors = sum((settings.gpus or 0) * settings.actors_per_gpu for settings in fleet.values())
    share = min(1.0 / settings.actors_per_gpu for settings in fleet.values())
    resources = config.resources.model_copy(update={"actors": actors, "gpus_per_actor": share})
    return config.model_copy(update={"fleet": fleet, "resources": resources})


def resolve_precision(config: JobConfig, types: dict[str, GpuType]) -> tuple[JobConfig, str]:
    """`model.dtype: auto` resolved once for the job (`core.accelerators.resolve_auto_dtype`) from
    the GPU types its actors can land on (the fleet's, else the cluster's), so that every row of a
    mixed fleet renders in one precision with one VAE. Returns the config and why, for messages;
    an explicit dtype is kept ("")."""
    if config.model.dtype != "auto":
        return config, ""
    names = list(config.fleet) if config.fleet else list(types)
    dtype, why = resolve_auto_dtype(names, on_gpu=config.resources.on_gpu)
    if dtype == "auto":
        logger.warning("model.dtype auto: %s; set model.dtype to pin one precision for every GPU", why)
        return config, why
    logger.info("model.dtype auto -> %s: %s", dtype, why)
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})}), why


class FleetSlots:
    """Ray Data's `ray_remote_args_fn` for a fleet's generator pool: called before each actor
    starts, it gives the resources of the type furthest below its share of the actors (Ray Data
    2.60 accounts each actor's own resources). An actor Ray restarts keeps its options, so a type
    keeps its actors through node losses."""

    def __init__(self, fleet: dict[str, FleetTypeConfig]):
        self.fleet = fleet
        self.wanted = {name: (t.gpus or 1) * t.actors_per_gpu for name, t in fleet.items()}
        self.started: Counter[str] = Counter()

    def __call__(self) -> dict[str, Any]:
        name = min(self.wanted, key=lambda t: (self.started[t] / self.wanted[t], t))
        self.started[name] += 1
        return {
            "num_gpus": 1.0 / self.fleet[name].actors_per_gpu,
            "resources": {f"{RESOURCE_PREFIX}{name}": TYPE_SHARE},
        }

"""Where planning work runs: in this process, or as Ray tasks on the cluster's nodes.

The planner (`plan.rows`) is written as plain functions over small arguments and Arrow tables;
an executor only decides where they run, as datatrove's executors do. `RayExecutor` runs each as
a Ray task, so what a task returns stays in the object store, on the node that made it, and the
driver handles references; `LocalExecutor` calls them in this process (tests, small manifests),
so the same code plans a three-row manifest without starting Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pipeline.core.errors import SdxlBatchError


class PlanExecutor(Protocol):
    """Runs planning functions somewhere and gives back handles to what they return."""

    distributed: bool

    def submit(self, fn: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        """Start `fn(*args)`: a handle, or a list of `num_returns` handles for a function that
        returns that many values. Handles given as arguments arrive as their values."""
        ...

    def get(self, handles: Sequence[Any]) -> list[Any]:
        """The values behind `handles`, waiting for them."""
        ...


class LocalExecutor:
    """Runs every function at once, in this process: handles are the values themselves."""

    distributed = False

    def submit(self, fn: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        result = fn(*args)
        return list(result) if num_returns > 1 else result

    def get(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)


class RayExecutor:
    """Runs every function as a Ray task of one CPU; retried where a node is lost (lineage)."""

    distributed = True
    MAX_RETRIES = 3

    def __init__(self) -> None:
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        import ray

        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(fn)
        refs = remote.options(num_returns=num_returns, num_cpus=1, max_retries=self.MAX_RETRIES).remote(*args)
        return list(refs) if num_returns > 1 else refs

    def get(self, handles: Sequence[Any]) -> list[Any]:
        """The values; a task's own error (a ManifestError naming a file and row) is raised as
        itself, not wrapped in Ray's RayTaskError with the worker's traceback."""
        import ray

        try:
            return list(ray.get(list(handles)))
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, SdxlBatchError):
                raise error.cause from None
            raise

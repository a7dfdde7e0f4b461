"""Which loads to run, per GPU type: the search over load settings that Ray Tune's searcher asks.

Per type, `grid` runs every load setting of the space; `quick` hill-climbs: it starts at the
quality reference (every switch off) and runs it with all its neighbours (one dimension changed)
at once, so that every GPU of the type has work; then the neighbours of the best setting so far,
until PATIENCE loads in a row gain under MIN_GAIN (`sweep.Climb`) or none is left. A load's value
is its best eligible point (measured, within the constraints, through the quality gate).

A mixed fleet runs one setting of what changes pixels on every type. When the types' climbs end
at different ones, each type also runs the others' (with its own best layout and actors), so
that the fleet can be chosen from settings measured on every type (`results.choose_fleet`).

Cached loads are recorded without running. Everything here is plain Python: `tune.TuneSearcher`
adapts it to Ray Tune, and the tests drive it directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from pipeline.commands.tuning.points import Load
from pipeline.commands.tuning.space import BatchCandidates, LoadSetting, SearchSpace
from pipeline.commands.tuning.sweep import Climb


@dataclass(frozen=True)
class LoadRequest:
    """A load to run: where, what, and which batch settings to measure on it."""

    accelerator_type: str
    load: LoadSetting
    batches: BatchCandidates
    reference: bool  # the quality reference of its type
    in_space: bool  # False: a reference outside the space, run for its quality sample only


class TypeSearch:
    """The loads of one GPU type (see the module docstring)."""

    def __init__(self, accelerator_type: str, space: SearchSpace, *, mode: str, gpus: int):
        self.type, self.space, self.mode, self.gpus = accelerator_type, space, mode, max(1, gpus)
        self.reference = space.reference_for(accelerator_type)
        self.queue: deque[LoadSetting] = deque()
        self.seen: set[LoadSetting] = set()
        self.running: set[LoadSetting] = set()
        self.results: dict[LoadSetting, Load] = {}
        self.climb = Climb()
        self.round: set[LoadSetting] = set()  # quick: the loads of the current round
        self.reconciled = False
        self.forced: set[LoadSetting] = set()  # run even after the climb stopped: the fleet's round
        self.requests: dict[LoadSetting, LoadRequest] = {}  # as requested (the cache's key)
        self._add([self.reference])
        if mode == "grid":
            self._add(space.loads_for(accelerator_type))
        else:
            start = space.start_for(accelerator_type)
            self._add([start, *space.neighbours(start, accelerator_type)])
            self.round = set(self.queue)

    def _add(self, loads: list[LoadSetting]) -> None:
        for load in loads:
            if load not in self.seen:
                self.seen.add(load)
                self.queue.append(load)

    @property
    def stopped(self) -> bool:
        return self.mode == "quick" and self.climb.stopped

    def _runnable(self, load: LoadSetting) -> bool:
        return not self.stopped or load == self.reference or load in self.forced

    @property
    def idle(self) -> bool:
        """Nothing running and nothing more to run."""
        return not self.running and not any(self._runnable(load) for load in self.queue)

    def next(self) -> LoadSetting | None:
        """The next load to run, while the type has a GPU free for it."""
        if len(self.running) >= self.gpus:
            return None
        while self.queue:
            load = self.queue.popleft()
            if self._runnable(load):
                self.running.add(load)
                return load
        return None

    def record(self, result: Load) -> None:
        self.running.discard(result.load)
        self.results[result.load] = result
        if self.mode != "quick" or not self.space.contains(result.load):
            return
        self._climb(result)
        if self.round <= set(self.results) and not self.stopped and not self.reconciled:
            best = self.best_load()
            if best is not None:
                fresh = [n for n in self.space.neighbours(best.load, self.type) if n not in self.seen]
                self._add(fresh)
                self.round = set(fresh)

    def _climb(self, result: Load) -> None:
        best = max((p for p in result.points if p.eligible), key=lambda p: p.images_per_second, default=None)
        if best is None:
            self.climb.flat += 1
        else:
            self.climb.add(best)

    def best_load(self) -> Load | None:
        eligible = [r for r in self.results.values() if self.space.contains(r.load) and r.best_rate() > 0]
        return max(eligible, key=Load.best_rate, default=None)

    def largest_fit(self, load: LoadSetting) -> int | None:
        """The largest batch size that ran for this precision and actors per GPU so far."""
        fits = [
            r.largest_fitting_batch()
            for r in self.results.values()
            if (r.load.dtype, r.load.actors_per_gpu) == (load.dtype, load.actors_per_gpu)
        ]
        known = [f for f in fits if f is not None]
        return max(known) if known else None

    def reconcile(self, pixels: set[tuple[object, ...]]) -> None:
        """Add a load per pixel setting (of another type's best) this type has not measured, with
        this type's best layout and actors per GPU."""
        self.reconciled = True
        best = self.best_load()
        if best is None:
            return
        measured = {r.load.pixels for r in self.results.values()}
        for wanted in sorted(pixels - measured, key=str):
            dtype, attention, compile_, fuse_qkv = wanted
            load = replace(
                best.load, dtype=str(dtype), attention=str(attention), compile=bool(compile_), fuse_qkv=bool(fuse_qkv)
            )
            if self.space.allows(load, self.type) and load not in self.results and load not in self.running:
                self.forced.add(load)
                self.seen.discard(load)  # perhaps skipped when the climb stopped
                self._add([load])


class TunePlan:
    """Every type's search, and the fleet's reconciliation round once they have all ended."""

    def __init__(self, types: dict[str, int], space: SearchSpace, *, mode: str):
        self.space = space
        self.searches = {name: TypeSearch(name, space, mode=mode, gpus=gpus) for name, gpus in types.items()}
        self._turn = 0

    def next(self, cached: Callable[[LoadRequest], Load | None] = lambda _: None) -> LoadRequest | None:
        """The next load to run (round robin over the types with a GPU free), recording cached
        ones on the way; None when nothing can start now."""
        names = list(self.searches)
        for offset in range(len(names)):
            search = self.searches[names[(self._turn + offset) % len(names)]]
            while (load := search.next()) is not None:
                request = self.request(search, load)
                hit = cached(request)
                if hit is None:
                    self._turn = (self._turn + offset + 1) % len(names)
                    return request
                search.record(hit)
        if self._reconcile():
            return self.next(cached)
        return None

    def request(self, search: TypeSearch, load: LoadSetting) -> LoadRequest:
        request = LoadRequest(
            accelerator_type=search.type,
            load=load,
            batches=self.space.batches.narrowed(search.largest_fit(load)),
            reference=load == search.reference,
            in_space=self.space.contains(load),
        )
        search.requests[load] = request
        return request

    def record(self, result: Load) -> None:
        self.searches[result.accelerator_type].record(result)

    @property
    def finished(self) -> bool:
        """Nothing running, nothing left to run, and the fleet's round done (with two types or more)."""
        idle = all(s.idle for s in self.searches.values())
        return idle and (len(self.searches) < 2 or all(s.reconciled for s in self.searches.values()))

    def _reconcile(self) -> bool:
        """Once every type is idle: the fleet's round (see the module docstring), once. True when
        it ran."""
        if len(self.searches) < 2 or not all(s.idle for s in self.searches.values()):
            return False
        if all(s.reconciled for s in self.searches.values()):
            return False
        pixels = {best.load.pixels for s in self.searches.values() if (best := s.best_load()) is not None}
        for search in self.searches.values():
            search.reconcile(pixels)
        return True

    def loads(self) -> list[Load]:
        return [load for search in self.searches.values() for load in search.results.values()]

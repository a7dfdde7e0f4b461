"""Timing the phases of a model call without synchronising the device at each one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StageTimer:
    """Seconds per named phase of one model call.

    On CUDA each phase is bracketed by events recorded on the stream, read once the call's last
    event has completed (`finish`: the call's one synchronize), so that timing costs no sync per
    phase and queued GPU work counts in the phase that queued it. On CPU, wall seconds."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self._open: dict[str, Any] = {}  # spans begun by `start`

    def start(self, stage: str) -> None:
        """Open a span of `stage` (closed by `stop`): for hooks, which cannot hold a `with`."""
        if self.device == "cuda":
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[stage] = event
        else:
            self._open[stage] = time.perf_counter()

    def stop(self, stage: str) -> None:
        begun = self._open.pop(stage, None)
        if begun is None:
            return
        if self.device == "cuda":
            import torch

            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()
            self._events.append((stage, begun, end_event))
        else:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - begun

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.device == "cuda":
            import torch

            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
            yield
            end_event.record()
            self._events.append((stage, start_event, end_event))
            return
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def finish(self) -> dict[str, float]:
        """Wait for the call's last event, then the seconds of each phase."""
        if self._events:
            self._events[-1][2].synchronize()
        for stage, start_event, end_event in self._events:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + start_event.elapsed_time(end_event) / 1000
        self._events.clear()
        return self.seconds

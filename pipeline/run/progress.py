"""The job's one console line, live from launch to the summary.

Before the first image it names the phase the job is in (planning the manifest, starting Ray,
starting the generators, loading the model on N actors); then rows committed (in parts on
storage) and rows rendered (images out of the model, not yet committed), the rate over the last
minute and an ETA from that rate. It is redrawn every second whatever arrives: a job's first part
can take minutes, and a line that only moved when a part committed looked hung.

Rendered rows and loaded actors come from the generator actors, which tell a small Ray actor
(`ProgressBoard`) after each model call; the driver asks it once a second. Committed rows come
from the parts that reach the driver.

Everything else a job prints goes above the line, never inside it: while the line is shown, the
process's standard error (file descriptor 2, so Ray's C++ core worker and the lines Ray forwards
from workers too) passes through a pipe whose reader prints each line above the line, dropping
the few that nobody can act on (`NOISE`; `-v` shows them).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

logger = logging.getLogger(__name__)

WINDOW_S = 60.0  # the rate is the last minute's
PLAIN_EVERY_S = 10.0  # without a terminal: a line every 10 s and at each phase
# Console lines dropped unless -v, each with why nobody can act on it.
NOISE = (
    # Ray's core worker, once per Ray Data actor pool: the pool's constructor arguments live in the
    # object store while its actors may restart (ray-project/ray#53727). Ray Data holds them for the
    # pool's life; restarts after a lost node are tested (tests/integration/test_node_loss.py).
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    # After a Ctrl-C: the raylet's retries to reach a driver that has gone.
    re.compile(r"\(raylet\).*infinite retries remaining"),
)


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


class ProgressBoard:
    """A Ray actor (no resources) that the generator actors tell what they loaded and rendered."""

    def __init__(self) -> None:
        self.actors: dict[str, bool] = {}
        self.rendered = 0
        self.first_start: float | None = None  # epoch seconds: when the job's first model call began

    def loading(self, actor: str) -> None:
        self.actors.setdefault(actor, False)

    def loaded(self, actor: str) -> None:
        self.actors[actor] = True

    def add(self, rows: int, started: float) -> None:
        """A model call of `rows` images, begun at `started` (epoch seconds), has returned."""
        self.rendered += rows
        self.first_start = started if self.first_start is None else min(self.first_start, started)

    def snapshot(self) -> tuple[int, int, int, float | None]:
        """(actors started, actors loaded, rows rendered, the first call's start)."""
        return len(self.actors), sum(self.actors.values()), self.rendered, self.first_start


def start_board() -> Any:
    """A `ProgressBoard` actor for this job (dies with the driver)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class LineState:
    """What the line shows; `text()` draws it."""

    started: float
    phase: str = "starting"
    total: int = 0
    committed: int = 0
    rendered: int = 0
    actors: int = 0  # generator actors the job asks for
    started_actors: int = 0
    loaded_actors: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    first_start: float | None = None  # when the first model call began: the rate's baseline

    def sample(self, now: float) -> None:
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= WINDOW_S:
            self.samples.popleft()

    @property
    def done(self) -> int:
        return max(self.rendered, self.committed)

    def rate(self, now: float) -> float | None:
        """Images per second over the last minute, or since the first model call began when that
        was less than a minute ago (the start-up before it is not rendering time)."""
        if self.done == 0:
            return None
        if self.first_start is not None and 0 < now - self.first_start <= WINDOW_S:
            # At least one whole call lies between: its images over its time, then a steadier rate.
            return self.done / (now - self.first_start)
        then, done_then = self.samples[0] if self.samples else (now, self.done)
        if now - then < 0.5:
            return None
        return (self.done - done_then) / (now - then)

    def text(self, now: float) -> str:
        elapsed = _clock(now - self.started)
        if self.done == 0 and not self.total:
            return f"{self.phase} | {elapsed} elapsed"
        if self.done == 0:
            phase = self.phase
            if self.actors and self.started_actors:
                phase = f"loading the model: {self.loaded_actors}/{self.actors} actors ready"
            return f"{phase} | 0/{self.total:,} rows | {elapsed} elapsed"
        rate = self.rate(now)
        speed, eta = "? img/s", "?"
        if rate is not None:
            speed = f"{rate:.2f} img/s"
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"rendering: {self.committed:,}/{self.total:,} committed, {self.done:,} rendered | "
            f"{speed} (last min) | {elapsed} elapsed, ETA {eta}"
        )


class JobLine:
    """The line on a stream (a terminal: redrawn in place every second; anything else: a plain
    line at each phase and every `PLAIN_EVERY_S`). `enabled=False` shows nothing."""

    def __init__(self, *, enabled: bool, stream: IO[str] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.clock = clock
        self.state = LineState(started=clock())
        self.label = ""
        self.active = True  # a job is running: between `restart` (or the start) and `finish`
        self.board: Any = None
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._shown = ""
        self._last_plain = -math.inf
        self._plain_key: tuple[str, int, int, int] | None = None

    # --- what the job tells it ------------------------------------------------------------------

    def restart(self, label: str = "") -> None:
        """A new job on the same console (`compare`: one per preset), its line prefixed `label: `."""
        with self._lock:
            self.state = LineState(started=self.clock())
            self.label, self.active, self.board = label, True, None
            self._shown, self._plain_key, self._last_plain = "", None, -math.inf

    def phase(self, text: str) -> None:
        with self._lock:
            self.state.phase = text
            self._draw(force=True)

    def begin(self, total: int, *, actors: int, board: Any = None) -> None:
        """Rendering starts: `total` rows, on `actors` generator actors reporting to `board`."""
        with self._lock:
            self.state.total, self.state.actors, self.board = total, actors, board
            self.state.phase = "starting the generators"
            self._draw(force=True)

    def committed(self, rows: int) -> None:
        with self._lock:
            self.state.committed += rows
            self.state.sample(self.clock())
            self._draw()

    def write(self, text: str) -> None:
        """A line of other output, printed above the line."""
        with self._lock:
            if self.tty and self._shown and self.active:
                self.stream.write("\r\x1b[K")
            self.stream.write(text if text.endswith("\n") else text + "\n")
            self._shown = ""
            self._draw(force=self.tty)

    def finish(self) -> None:
        """The last state, then the line ends (the summary follows on its own line)."""
        with self._lock:
            if self.enabled and self.active and (self._shown or not self.tty):
                self._draw(force=True)
                if self.tty:
                    self.stream.write("\n")
                    self.stream.flush()
            self._shown = ""
            self.active = False

    # --- drawing --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Once a second: ask the board, then redraw."""
        board = self.board
        if board is not None:
            try:
                import ray

                if isinstance(board, ProgressBoard):  # a job in this process (`run.inprocess`)
                    started, loaded, rendered, first_start = board.snapshot()
                else:
                    started, loaded, rendered, first_start = ray.get(board.snapshot.remote(), timeout=2)
            except Exception as error:  # the line must never stop the job
                logger.debug("progress board: %s", error)
            else:
                with self._lock:
                    self.state.started_actors, self.state.loaded_actors = started, loaded
                    self.state.rendered = max(self.state.rendered, rendered)
                    self.state.first_start = first_start
        with self._lock:
            now = self.clock()
            if self.state.done:
                self.state.sample(now)
            self._draw()

    def _draw(self, *, force: bool = False) -> None:
        if not (self.enabled and self.active):
            return
        now = self.clock()
        text = (f"{self.label}: " if self.label else "") + self.state.text(now)
        if self.tty:  # cut to the terminal's width: a wrapped line cannot be redrawn in place
            self.stream.write("\r\x1b[K" + text[: max(20, shutil.get_terminal_size().columns - 1)])
        else:  # a plain line when the phase or the counts changed, or every PLAIN_EVERY_S
            key = (self.state.phase, self.state.committed, self.state.done, self.state.loaded_actors)
            if not ((force and key != self._plain_key) or now - self._last_plain >= PLAIN_EVERY_S):
                return
            self.stream.write(text + "\n")
            self._last_plain, self._plain_key = now, key
        self.stream.flush()
        self._shown = text


@contextmanager
def ticking(line: JobLine, *, seconds: float = 1.0) -> Iterator[None]:
    """`line.tick()` every `seconds` while the block runs."""
    if not (line.enabled and line.active):
        yield
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(seconds):
            line.tick()

    thread = threading.Thread(target=run, name="sdxl-batch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


_DRAINED = "\x00sdxl-batch: console drained\n"


@contextmanager
def console_above(line: JobLine, *, verbose: bool) -> Iterator[None]:
    """While the job runs, whatever the process writes to its standard error (Python,
    Ray's C++ core worker, workers' lines forwarded by Ray) is printed above it, line by line;
    `NOISE` is dropped unless `verbose`. The line itself writes to the original stream.

    Processes started meanwhile (an embedded Ray's) inherit the pipe as their standard error, so
    it may never reach its end: at the end of the block, a marker written after the last of our
    own output says when the pipe has been read that far; the reader stays, printing whatever
    those processes still write."""
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
    except (OSError, ValueError):  # no real file descriptor 2 (an embedding application)
        yield
        return
    read_end, write_end = os.pipe()
    line.stream = os.fdopen(terminal, "w", encoding="utf-8", errors="replace")
    os.dup2(write_end, 2)
    drained = threading.Event()

    def pump() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as pipe:
            for text in pipe:
                if text == _DRAINED:
                    drained.set()
                elif verbose or not is_noise(text):
                    line.write(text)

    threading.Thread(target=pump, name="sdxl-batch-console", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(line.stream.fileno(), 2)
        os.write(write_end, _DRAINED.encode())
        os.close(write_end)
        drained.wait(timeout=5)
        line.stream.flush()

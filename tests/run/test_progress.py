"""The job's console line: its phases, counts, rate and ETA; redrawn every second; other output
above it, and the console lines nobody can act on dropped."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

from pipeline.run.progress import WINDOW_S, JobLine, LineState, is_noise, ticking
from pipeline.run.runner import WallClock

CORE_WORKER = (
    "[2026-12-05 18:37:42,825 E 1334 1334] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(GenerateImages))' and ID: '6b04' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart will fail."
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_before_the_first_image_the_line_names_the_phase() -> None:
    state = LineState(started=0.0)
    state.phase = "starting Ray"
    assert state.text(3.0) == "starting Ray | 00:03 elapsed"
    state.total, state.actors, state.phase = 112, 2, "starting the generators"
    assert state.text(5.0) == "starting the generators | 0/112 rows | 00:05 elapsed"
    state.started_actors, state.loaded_actors = 2, 1
    assert state.text(65.0) == "loading the model: 1/2 actors ready | 0/112 rows | 01:05 elapsed"


def test_the_rate_counts_from_the_first_model_call_then_over_the_last_minute() -> None:
    state = LineState(started=0.0, total=240, actors=1)
    # 110 s of start-up, then the first call began at 110 s: 48 rows rendered by 120 s, 8 committed.
    state.first_start, state.rendered, state.committed = 110.0, 48, 8
    state.sample(120.0)
    assert state.text(120.0) == (
        "rendering: 8/240 committed, 48 rendered | 4.80 img/s (last min) | 02:00 elapsed, ETA 00:40"
    )
    # Later the rate is the last minute's: 60 more rows in the minute to 300 s.
    for t, done in ((240.0, 120), (250.0, 130), (300.0, 180)):
        state.rendered = done
        state.sample(t)
    assert abs((state.rate(300.0) or 0) - 1.0) < 1e-9 and 300.0 - state.samples[0][0] <= WINDOW_S + 10
    # A job done within a second of its first call still shows a rate: its images over that time.
    fast = LineState(started=0.0, total=24, actors=1, first_start=3.5, rendered=24, committed=24)
    assert abs((fast.rate(3.8) or 0) - 80.0) < 1e-9
    assert "80.00 img/s" in fast.text(3.8) and "ETA 00:00" in fast.text(3.8)


def test_a_plain_stream_gets_a_line_per_phase_and_change_a_terminal_a_redrawn_one() -> None:
    clock, out = Clock(), io.StringIO()
    line = JobLine(enabled=True, stream=out, clock=clock)
    line.phase("planning the manifest")
    line.phase("starting Ray")
    line.begin(16, actors=1)
    line.tick()  # nothing changed: no line
    line.committed(8)
    line.write("a warning from a worker")
    clock.now += 2
    line.committed(8)
    line.finish()
    line.finish()
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "planning the manifest | 00:00 elapsed", "starting Ray | 00:00 elapsed",
        "starting the generators | 0/16 rows | 00:00 elapsed",
    ]  # fmt: skip
    # Counts alone print a plain line every 10 s at most (a log of a long job stays short); the
    # last state is printed at the end.
    assert lines[3] == "a warning from a worker"
    assert lines[4].startswith("rendering: 16/16 committed, 16 rendered") and len(lines) == 5
    clock.now += 11
    line = JobLine(enabled=True, stream=out, clock=clock)
    line.begin(16, actors=1)
    clock.now += 11
    line.committed(8)
    assert out.getvalue().splitlines()[-1].startswith("rendering: 8/16 committed")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    line = JobLine(enabled=True, stream=term, clock=clock)
    line.phase("starting Ray")
    line.write("between")
    line.finish()
    assert term.getvalue() == (
        "\r\x1b[Kstarting Ray | 00:00 elapsed\r\x1b[Kbetween\n\r\x1b[Kstarting Ray | 00:00 elapsed"
        "\r\x1b[Kstarting Ray | 00:00 elapsed\n"
    )
    off = io.StringIO()
    JobLine(enabled=False, stream=off).phase("starting Ray")
    assert off.getvalue() == ""


def test_the_line_is_redrawn_every_second_while_nothing_arrives() -> None:
    class Counting(JobLine):
        ticks = 0

        def tick(self) -> None:
            Counting.ticks += 1

    line = Counting(enabled=True, stream=io.StringIO())
    with ticking(line, seconds=0.05):
        time.sleep(0.5)
    assert Counting.ticks >= 3
    ticked = Counting.ticks
    time.sleep(0.2)
    assert Counting.ticks == ticked  # stopped with the job


def test_console_lines_nobody_can_act_on_are_known() -> None:
    assert is_noise(CORE_WORKER)
    assert is_noise("(raylet) [2026-12-05 18:40:01] Failed to connect to GCS, infinite retries remaining")
    assert not is_noise("[2026-12-05 18:37:42,825 E 1334 1334] core_worker.cc:901: Failed to register worker")
    assert not is_noise("WARNING pipeline.run.runner: skipping 4 bad row(s)")


def test_whatever_reaches_file_descriptor_2_goes_above_the_line_without_the_noise() -> None:
    """Ray's C++ core worker writes to the process's file descriptor 2, not to sys.stderr."""
    code = (
        "import os, sys, time\n"
        "from pipeline.run.progress import JobLine, console_above\n"
        "line = JobLine(enabled=True)\n"
        "with console_above(line, verbose=sys.argv[1] == 'v'):\n"
        "    line.phase('starting Ray')\n"
        f"    os.write(2, {(CORE_WORKER + chr(10)).encode()!r})\n"
        "    os.write(2, b'a real error from C++\\n')\n"
        "    print('a Python warning', file=sys.stderr)\n"
        "    line.finish()\n"
        "print('after', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True, timeout=60, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == [
        "starting Ray | 00:00 elapsed", "a real error from C++", "a Python warning", "after",
    ], quiet.stderr  # fmt: skip
    verbose = subprocess.run([sys.executable, "-c", code, "v"], capture_output=True, text=True, timeout=60, env=env)
    assert "core_worker.cc:2465" in verbose.stderr


def test_the_wall_time_breaks_down_into_phases_that_add_up() -> None:
    clock = WallClock(0.0)
    clock.marks = {"planning": 0.4, "starting_ray": 3.0, "first_image": 9.5, "rendering": 20.0}
    assert clock.breakdown(21.0) == {
        "planning": 0.4, "starting_ray": 2.6, "starting_generators": 6.5, "rendering": 10.5, "finishing": 1.0,
    }  # fmt: skip
    clock.marks = {"planning": 0.4}  # nothing to render
    assert clock.breakdown(0.5) == {
        "planning": 0.4, "starting_ray": 0.0, "starting_generators": 0.0, "rendering": 0.0, "finishing": 0.1,
    }  # fmt: skip

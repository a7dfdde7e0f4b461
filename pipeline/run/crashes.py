"""A worker process that died more often than `resources.max_retries` allows, as our own error.

Ray reports a dead process as an ActorDiedError (a generator actor: class, pid and node, and
Ray's guesses at the cause) or a WorkerCrashedError (a read, encode or write task: no stage, no
pid). Ray Data logs on the driver which operator failed and whether its actors died while
starting (loading the model); `FailedStage` listens for that, and `worker_death` turns both into
a `WorkerDiedError` saying which stage died, how often, what Ray saw last, where the process's log
is and what to do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.core.errors import WorkerDiedError, exception_chain

# Our stage classes, as they appear in Ray Data's operator names ("MapBatches(EncodeImages)").
STAGES = {"ReadManifest": "read", "GenerateImages": "generate", "EncodeImages": "encode", "WriteParts": "write"}
LOGS = (
    "worker-*-PID.err and python-core-worker-*_PID.log in the Ray session's logs on that node "
    "(by default /tmp/ray/session_latest/logs)"
)


class FailedStage(logging.Handler):
    """Records which Ray Data operator stopped the job, from Ray Data's error log on the driver."""

    _INIT_DEATH = re.compile(r"^(?P<operator>\S+): actors died during initialization")
    _TASK_ERROR = re.compile(r'exception was raised from a task of operator "(?P<operator>[^"]+)"')

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.operator: str | None = None
        self.while_loading = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for pattern in (self._INIT_DEATH, self._TASK_ERROR):
            match = pattern.search(message)
            if match and self.operator is None:  # the first failure is the one that stops the job
                self.operator = match.group("operator")
                self.while_loading = pattern is self._INIT_DEATH

    @property
    def stage(self) -> str | None:
        """Our name of the failed stage ("encode"; "read + encode" for fused operators)."""
        names = [name for cls, name in STAGES.items() if f"({cls})" in (self.operator or "")]
        return " + ".join(names) or None


@contextmanager
def watch_failed_stage() -> Iterator[FailedStage]:
    """Listen to Ray Data's log (the `ray.data` logger of this, the driver's, process)."""
    handler = FailedStage()
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def worker_death(
    error: BaseException, *, max_retries: int, failed: FailedStage | None = None
) -> WorkerDiedError | None:
    """Our error for a Ray exception (or one it wraps) that says a worker process died, else None.

    An actor whose constructor raised (a Python exception, not a dead process) is not one:
    Ray reports it as an ActorDiedError too, with `actor_init_failed` set."""
    import ray.exceptions

    for current in exception_chain(error):
        if isinstance(current, ray.exceptions.ActorDiedError) and not current.actor_init_failed:
            return _actor_died(str(current), max_retries, failed)
        if isinstance(current, ray.exceptions.WorkerCrashedError | ray.exceptions.OutOfMemoryError):
            return _task_died(str(current), max_retries, failed)
    return None


def _deaths(max_retries: int, restarted: str, retries: str) -> str:
    if max_retries == 0:
        return f"once (resources.max_retries: 0, no {retries})"
    return f"{max_retries + 1} times: Ray {restarted} it resources.max_retries={max_retries} times"


def _actor_died(text: str, max_retries: int, failed: FailedStage | None) -> WorkerDiedError:
    pid = _field(text, "pid")
    node = _field(text, "ip")
    if failed is not None and failed.operator is not None:
        doing = "while loading the model" if failed.while_loading else "while rendering a batch"
    else:
        doing = "while loading the model or rendering a batch"
    where = f" (pid {pid}" + (f" on node {node})" if node else ")") if pid else ""
    deaths = _deaths(max_retries, "restarted", "restarts")
    return WorkerDiedError(
        f"the generator actor's process died {doing}, {deaths}. Last death{where}: "
        f"{_ray_detail(text)}. Deaths like this are the model, the GPU driver or other native code crashing the "
        "process (a corrupt or incompatible weight file, a driver/CUDA mismatch), or the node running out of "
        f"memory: see the process's log, {LOGS.replace('PID', pid or '<pid>')}. If the deaths were transient "
        "(nodes lost or preempted), raise resources.max_retries; the same command resumes from the committed parts."
    )


def _task_died(text: str, max_retries: int, failed: FailedStage | None) -> WorkerDiedError:
    stage = failed.stage if failed is not None else None
    task = f"{'an' if stage and stage[0] in 'aeiou' else 'a'} {stage} task" if stage else "a read, encode or write task"
    return WorkerDiedError(
        f"the worker process running {task} died {_deaths(max_retries, 'retried', 'retries')}. Last death: "
        f"{_ray_detail(text)}. Deaths like this are native code crashing the process (an image "
        f"or storage library), or the node running out of memory: see the process's log, "
        f"{LOGS.replace('PID', '<pid>')} (the console names the pid above). If the deaths were transient (nodes "
        "lost or preempted), raise resources.max_retries; the same command resumes from the committed parts."
    )


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^\s*{name}: (\S+)$", text, re.MULTILINE)
    return match.group(1) if match else None


def _ray_detail(text: str) -> str:
    """Ray's account of the death without its header fields, its list of common causes and its
    pointer to log files (ours says which)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("\t")]
    detail = " ".join(line for line in lines if line != "The actor died unexpectedly before finishing this task.")
    detail = re.sub(r"Worker exit type: \S+ Worker exit detail: ", "", detail)
    for tail in (" Some common causes include", " Check python-core-worker", " Refer to the documentation"):
        detail = detail.split(tail)[0]
    detail = detail.strip().rstrip(".")
    if "unexpectedly" in detail:  # Ray heard nothing from the process before it went
        detail += " (the process ended without a word to Ray: a crash such as SIGSEGV, or the kernel's OOM killer)"
    return detail[:400] + ("..." if len(detail) > 400 else "")

from __future__ import annotations

import logging

import pytest

from pipeline.core.errors import WorkerDiedError
from pipeline.run.crashes import watch_failed_stage, worker_death

RAY_DETAIL = (
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
    "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
    "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error."
)


def _actor_died() -> BaseException:
    """As Ray 2.60 reports a generator actor whose process died (measured with an injected SIGSEGV)."""
    from ray.core.generated import common_pb2
    from ray.exceptions import ActorDiedError

    context = common_pb2.ActorDiedErrorContext(  # type: ignore[attr-defined]
        error_message=RAY_DETAIL,
        class_name="MapWorker(MapBatches(GenerateImages))",
        actor_id=bytes(range(16)),
        pid=4242,
        node_ip_address="10.0.0.7",
    )
    return ActorDiedError(context)


def _ray_data_logs(message: str) -> None:
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").error(message)


@pytest.mark.parametrize(
    ("log", "doing"),
    [
        ("MapBatches(GenerateImages): actors died during initialization 1 consecutive time(s) "
         "(max_consecutive_actor_init_deaths=0); failing execution.", "while loading the model"),
        ('An exception was raised from a task of operator "MapBatches(GenerateImages)". Dataset execution will '
         "now abort.", "while rendering a batch"),
        (None, "while loading the model or rendering a batch"),
    ],
)  # fmt: skip
def test_a_dead_actor_becomes_our_error_naming_what_where_and_what_to_do(log: str | None, doing: str) -> None:
    with watch_failed_stage() as failed:
        if log:
            _ray_data_logs(log)
    error = worker_death(_actor_died(), max_retries=2, failed=failed)
    assert isinstance(error, WorkerDiedError)
    message = str(error)
    assert message.startswith(f"the generator actor's process died {doing}, 3 times: Ray restarted it ")
    assert "resources.max_retries=2 times" in message
    assert "(pid 4242 on node 10.0.0.7)" in message and "worker-*-4242.err" in message
    assert "Worker unexpectedly exits with a connection error code 2" in message
    assert "Some common causes" not in message and "\n" not in message  # Ray's advice and layout left out
    assert "raise resources.max_retries" in message


def test_a_dead_task_worker_names_its_stage() -> None:
    from ray.exceptions import WorkerCrashedError

    with watch_failed_stage() as failed:
        _ray_data_logs('An exception was raised from a task of operator "MapBatches(EncodeImages)". Dataset ...')
    try:
        raise RuntimeError("execution failed") from WorkerCrashedError()
    except RuntimeError as wrapped:
        error = worker_death(wrapped, max_retries=0, failed=failed)
    assert isinstance(error, WorkerDiedError)
    assert str(error).startswith("the worker process running an encode task died once (resources.max_retries: 0")
    assert "The worker died unexpectedly while executing this task" in str(error)
    # Without Ray Data's log line the stage is unknown, and the message says which it may be.
    unknown = worker_death(WorkerCrashedError(), max_retries=1)
    assert unknown is not None and "running a read, encode or write task died 2 times" in str(unknown)


def test_other_failures_are_not_worker_deaths() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    # A Python exception in the constructor: the process lived (our own errors are found in its text).
    raised = RayTaskError("MapWorker.__init__", "Traceback (most recent call last):\nValueError: x", ValueError("x"))
    assert worker_death(ActorDiedError(raised), max_retries=2) is None
    assert worker_death(RuntimeError("a bug"), max_retries=2) is None
    with watch_failed_stage():
        pass
    assert not any(type(h).__name__ == "FailedStage" for h in logging.getLogger("ray.data").handlers)

"""What `sdxl-batch submit` ships as the job's working directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.commands.submit import SUBMITTED_CONFIG, retry_while_starting, working_dir
from pipeline.core.errors import ClusterError
from tests.helpers import write_config


def test_working_dir_ships_the_package_the_entrypoint_and_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"))
    with working_dir(config) as folder:
        assert (folder / "pipeline" / "__init__.py").is_file()
        assert (folder / "pipeline" / "output" / "report" / "templates" / "report.html.j2").is_file()
        assert (folder / "jobs" / "generate.py").is_file() and (folder / "configs" / "demo.yaml").is_file()
        assert (folder / SUBMITTED_CONFIG).is_file()
        assert not list(folder.rglob("__pycache__"))


def _failing(*errors: Exception) -> Callable[[], str]:
    """An action raising `errors` in turn, then answering "job-1"."""
    queue = list(errors)

    def action() -> str:
        if queue:
            raise queue.pop(0)
        return "job-1"

    return action


def test_a_starting_head_is_retried_with_backoff_saying_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr("pipeline.commands.submit.time.sleep", pauses.append)
    action = _failing(
        ConnectionError("Failed to connect to Ray at address: http://h:8265 (Connection refused)"),
        RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later."),
        RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later."),
    )
    assert retry_while_starting("http://h:8265", action) == "job-1"
    assert pauses == [1.0, 2.0, 4.0]
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines[0]
        == "the Ray head at http://h:8265 is still starting (its dashboard does not answer yet); retrying in 1 s"
    )
    assert lines[1].endswith("(its job agent is not up yet); retrying in 2 s")


def test_a_head_that_never_finishes_starting_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("pipeline.commands.submit.time.monotonic", lambda: float(next(clock)))
    monkeypatch.setattr("pipeline.commands.submit.time.sleep", lambda seconds: None)

    def action() -> str:
        raise RuntimeError("No available agent to submit job, please try again later.")

    with pytest.raises(ClusterError, match=r"was still starting after 30 s .*submit again") as caught:
        retry_while_starting("http://h:8265", action, wait_seconds=30)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.commands.submit.time.sleep", lambda seconds: pytest.fail("retried"))

    def action() -> str:
        raise RuntimeError("Request failed with status code 400: bad runtime env")

    with pytest.raises(ClusterError, match="answered: RuntimeError: Request failed with status code 400"):
        retry_while_starting("http://h:8265", action)

"""One writer per output: the lease (`output.lease`), on local disk and on S3 (moto's server)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import LeaseHeld, StorageError
from pipeline.core.io import filesystem
from pipeline.output.lease import LeaseRecord, OutputLease, describe_writer
from pipeline.output.verify import verify_output


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def _lease(output: str, **kwargs: Any) -> OutputLease:
    fs, root = filesystem(output)
    return OutputLease(fs, root, command="run", **kwargs)


def _record(output: str) -> LeaseRecord | None:
    fs, root = filesystem(output)
    fs.invalidate_cache()
    try:
        return LeaseRecord.parse(fs.cat_file(f"{root}/lease.json"))
    except FileNotFoundError:
        return None


def _plant(output: str, **fields: Any) -> None:
    """A lease left by another writer (as its process wrote it)."""
    now = time.time()
    record = LeaseRecord(
        token="theirs", command="run", host=socket.gethostname(), pid=1, started_at=now - 60, heartbeat_at=now,
        expires_after_s=300.0,
    )  # fmt: skip
    fs, root = filesystem(output)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/lease.json", json.dumps(asdict(replace(record, **fields))).encode())


def test_a_second_writer_is_refused_with_who_holds_the_output(output: str) -> None:
    with _lease(output) as first:
        held = _record(output)
        assert held is not None and held.host == socket.gethostname() and held.command == "run"
        with pytest.raises(LeaseHeld) as refused:
            _lease(output).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}" in message and "since" in message and "last heartbeat" in message
        assert "Wait for that job to finish" in message and "--takeover" in message
        assert describe_writer(*filesystem(output)) is not None
        assert first.took_over is None
    assert _record(output) is None  # released
    with _lease(output):  # and free again
        pass
    if "://" not in output:
        assert not Path(output).exists()  # the folder made for the lease alone is gone with it


def test_of_writers_racing_for_an_empty_output_exactly_one_wins(output: str) -> None:
    won: list[OutputLease] = []
    refused: list[BaseException] = []
    start = threading.Barrier(8)

    def contend() -> None:
        lease = _lease(output)
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as error:
            refused.append(error)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_a_holder_whose_process_is_gone_from_this_host_is_taken_over_at_once(output: str) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(output, pid=int(gone.stdout))
    with _lease(output) as lease:
        assert lease.took_over == f"its process {int(gone.stdout)} is gone from this host"
        record = _record(output)
        assert record is not None and record.token != "theirs"


def test_a_holder_on_another_host_is_taken_over_only_once_its_heartbeat_expired(output: str) -> None:
    _plant(output, host="other-node", heartbeat_at=time.time() - 30, expires_after_s=60.0)
    with pytest.raises(LeaseHeld, match="host other-node"):
        _lease(output).acquire()
    fs, root = filesystem(output)
    assert "a job is writing this output" in (describe_writer(fs, root) or "")

    _plant(output, host="other-node", heartbeat_at=time.time() - 90, expires_after_s=60.0)
    assert "is stale" in (describe_writer(fs, root) or "")
    with _lease(output) as lease:
        assert lease.took_over is not None and "heartbeat stopped" in lease.took_over


def test_takeover_forces_and_the_old_holder_stops_before_removing_anything(output: str) -> None:
    old = _lease(output, expiry_s=1.0).acquire()  # renews every 0.2 s
    new = _lease(output, takeover=True).acquire()
    assert new.took_over == "--takeover"
    deadline = time.monotonic() + 10
    while old.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.lost_to is not None
    with pytest.raises(StorageError, match="took over the output"):
        old.check()
    old.release()  # not its lease any more: left in place
    record = _record(output)
    assert record is not None and record.token == new._record.token  # type: ignore[union-attr]
    new.release()


def test_the_heartbeat_renews_the_lease(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    with _lease(output, expiry_s=1.0):
        first = _record(output)
        time.sleep(0.7)
        later = _record(output)
    assert first is not None and later is not None and later.heartbeat_at > first.heartbeat_at
    assert later.started_at == first.started_at and later.token == first.token


def test_verify_reads_without_the_lease_and_clean_needs_it(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    with _lease(output):
        report = verify_output(output)
        assert report.writer is not None and report.summary().startswith("note: a job is writing this output")
        with pytest.raises(LeaseHeld):
            verify_output(output, clean=True)
    assert verify_output(output, clean=True).writer is None
    assert _record(output) is None


def test_an_unparsable_lease_counts_as_stale(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "lease.json").write_bytes(b"")  # a power loss during its creation
    with _lease(str(output)) as lease:
        assert lease.took_over == "the lease does not parse"


def test_validate_says_a_job_is_writing_and_run_is_refused_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main
    from tests.helpers import prompt_rows, write_config, write_manifest

    output = str(tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(2))
    config = write_config(tmp_path / "job.yaml", manifest=str(manifest), output=output, model={"preset": "tiny"})
    with _lease(output):
        assert main(["validate", str(config)]) == 0
        assert "note       a job is writing this output: `run` (host " in capsys.readouterr().out
        assert main(["run", str(config), "--no-progress"]) == 2
        refused = capsys.readouterr().err
        assert refused.startswith(f"error: the output {output} is being written by `run`")
        assert "Traceback" not in refused

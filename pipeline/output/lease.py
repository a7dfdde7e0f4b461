"""One writer per output: a lease object under the output prefix (`lease.json`).

Exactly-once holds for one writer at a time: two jobs writing into one output would both render
the pending rows, and each one's end-of-job cleanup would remove the other's written but not yet
committed files (`output.orphans`). So every command that writes into an output (`run`, with
`--overwrite` too; `verify --clean`; the end-of-job cleanup inside `run`) first takes the lease:

- **Taking it** is a create that only one writer can win: `If-None-Match: *` on an object store
  (s3fs's exclusive mode; AWS S3 and moto honour it), an exclusive create (`O_EXCL`) on a local or
  network disk. The loser is refused at once (`LeaseHeld`, exit 2) with who holds the output since
  when, and what to do.
- **A holder that died** is taken over without any flag: at once when it ran on this host and its
  process is gone (a killed driver, rerun), otherwise when its heartbeat is older than its stated
  expiry (another host, preempted). `--takeover` forces it. Taking over removes the old lease only
  if it is still the one read, then creates ours exclusively: of two takers, one wins the create.
- **The heartbeat** (a thread) rewrites the lease every expiry/5 seconds. If it finds another
  writer's lease there (this job was taken for dead), it stops renewing and the job stops before
  its cleanup, removing nothing (`check`).
- **Releasing** it removes the object, if it is still ours.

Readers (`validate`, `verify` without `--clean`, `report`, `estimate`) take no lease; they say
when a job is writing (`describe_writer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pipeline.core.errors import LeaseHeld, StorageError
from pipeline.core.io import STORAGE_ERRORS, fsync_folder, full_uri, is_remote_fs, join, temporary_path, write_bytes
from pipeline.core.layout import LEASE_FILE

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

DEFAULT_EXPIRY_S = 300.0
_READ_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, *STORAGE_ERRORS)
_RENEW_ERRORS: tuple[type[Exception], ...] = (StorageError, *STORAGE_ERRORS)


@dataclass(frozen=True)
class LeaseRecord:
    """What `lease.json` holds."""

    token: str  # this lease's own id: a renewal or release touches only its own lease
    command: str  # "run", "run --overwrite", "verify --clean"
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    expires_after_s: float
    ray_job: str = ""  # the Ray job's submission id, for a submitted job

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """None for a lease that does not parse (a partial write, a foreign file): it counts as stale."""
        try:
            fields = json.loads(data)
            return cls(**{key: fields[key] for key in cls.__dataclass_fields__ if key in fields})
        except (ValueError, TypeError, KeyError):
            return None

    def age(self, now: float) -> float:
        return max(0.0, now - self.heartbeat_at)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return (
            f"`{self.command}` (host {self.host}, pid {self.pid}{job}) since {since}, "
            f"last heartbeat {self.age(now):.0f} s ago"
        )


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stale_reason(record: LeaseRecord | None, now: float, *, host: str | None = None) -> str | None:
    """Why a lease may be taken over without `--takeover`; None while its holder may be alive."""
    if record is None:
        return "the lease does not parse"
    host = host or socket.gethostname()
    if record.host == host and _process_gone(record.pid):
        return f"its process {record.pid} is gone from this host"
    if record.age(now) > record.expires_after_s:
        return f"its heartbeat stopped {record.age(now):.0f} s ago (expiry {record.expires_after_s:.0f} s)"
    return None


class OutputLease:
    """The lease on one output; a context manager: taken on entry, released on exit."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        *,
        command: str,
        expiry_s: float = DEFAULT_EXPIRY_S,
        takeover: bool = False,
    ):
        self.fs, self.root = fs, root
        self.path = join(root, LEASE_FILE)
        self.command = command
        self.expiry_s = expiry_s
        self.takeover = takeover
        self.took_over: str | None = None  # why, when this lease replaced a dead writer's
        self.lost_to: LeaseRecord | None = None  # set by the heartbeat: another writer took the output
        self._record: LeaseRecord | None = None
        self._created_root = False  # a local output folder made for the lease: removed with it if still empty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and releasing ---------------------------------------------------------------

    def acquire(self) -> OutputLease:
        now = time.time()
        record = LeaseRecord(
            token=uuid.uuid4().hex, command=self.command, host=socket.gethostname(), pid=os.getpid(),
            started_at=now, heartbeat_at=now, expires_after_s=self.expiry_s,
            ray_job=os.environ.get("RAY_JOB_SUBMISSION_ID", ""),
        )  # fmt: skip
        if not self._create(record):
            current = self._read()
            if current is None:  # released between our create and our read: try once more
                if not self._create(record):
                    raise self._refusal(self._holder())
            else:
                holder = LeaseRecord.parse(current)
                reason = "--takeover" if self.takeover else stale_reason(holder, now)
                if reason is None:
                    raise self._refusal(holder)
                self._replace(current, record, holder)
                self.took_over = reason
                logger.warning(
                    "took over the lease on %s from %s: %s",
                    self.uri,
                    holder.describe(now) if holder else "an unreadable lease",
                    reason,
                )
        self._record = record
        self._thread = threading.Thread(target=self._heartbeat, name="sdxl-batch-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._record is None or self.lost_to is not None:
            return
        try:
            if self._is_ours():
                self.fs.rm(self.path)
            if self._created_root:  # a job refused before writing anything leaves no folder behind
                with contextlib.suppress(OSError):
                    os.rmdir(self.root)
        except STORAGE_ERRORS as error:  # the next writer finds it stale (pid gone, or expired)
            logger.warning("could not release the lease %s: %s", self.uri, error)
        self._record = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """Raise when another writer took the output over while this one ran (before a cleanup)."""
        if self.lost_to is not None:
            raise StorageError(
                f"another writer took over the output {self.uri} while this job ran: "
                f"{self.lost_to.describe()}. This job stops without removing anything; its committed "
                "parts are kept. Run `sdxl-batch verify` once that writer has finished."
            )

    @property
    def uri(self) -> str:
        return full_uri(self.fs, self.root)

    # --- storage ------------------------------------------------------------------------------

    def _create(self, record: LeaseRecord) -> bool:
        """Create the lease object if none exists; False when one does."""
        data = record.to_bytes()
        try:
            if is_remote_fs(self.fs):
                self.fs.pipe_file(self.path, data, mode="create")  # PUT with If-None-Match: *
            else:
                if not os.path.isdir(self.root):
                    os.makedirs(self.root, exist_ok=True)
                    self._created_root = True
                self._link_into_place(data)
        except FileExistsError:
            return False
        except STORAGE_ERRORS as error:
            raise StorageError(
                f"cannot take the lease on the output {self.uri} ({self.path}): {type(error).__name__}: {error}. "
                "Check that the output is writable."
            ) from error
        return True

    def _link_into_place(self, data: bytes) -> None:
        """Create the lease whole or not at all: written and fsynced under a name of our own, then
        hard-linked to its name, which fails when that exists (POSIX, NFS included). An exclusive
        create then a write would let another writer read it empty in between, and take it over as
        unreadable (tests/output/test_lease.py: eight threads racing)."""
        temporary = temporary_path(self.path)  # an orphan (`output.orphans`) if we die right here
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(temporary, self.path)
            fsync_folder(self.root)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def _read(self) -> bytes | None:
        try:
            self.fs.invalidate_cache(self.path)
            data: bytes = self.fs.cat_file(self.path)
            return data
        except FileNotFoundError:
            return None
        except STORAGE_ERRORS as error:
            raise StorageError(f"cannot read the lease {self.path}: {type(error).__name__}: {error}") from error

    def _holder(self) -> LeaseRecord | None:
        data = self._read()
        return None if data is None else LeaseRecord.parse(data)

    def _replace(self, seen: bytes, record: LeaseRecord, holder: LeaseRecord | None) -> None:
        """Remove the dead writer's lease, if it is still the one read, and create ours."""
        if self._read() != seen:
            raise self._refusal(self._holder())
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            pass
        except STORAGE_ERRORS as error:
            raise StorageError(f"cannot remove the stale lease {self.path}: {error}") from error
        if not self._create(record):  # another writer took it over first
            raise self._refusal(self._holder())

    def _is_ours(self) -> bool:
        data = self._read()
        current = None if data is None else LeaseRecord.parse(data)
        return current is not None and self._record is not None and current.token == self._record.token

    def _heartbeat(self) -> None:
        interval = max(self.expiry_s / 5, 0.2)
        while not self._stop.wait(interval):
            record = self._record
            if record is None:
                return
            try:
                data = self._read()
                current = None if data is None else LeaseRecord.parse(data)
                if current is not None and current.token != record.token:
                    self.lost_to = current
                    logger.error("another writer took over the output %s: %s", self.uri, current.describe())
                    return
                renewed = LeaseRecord(**{**asdict(record), "heartbeat_at": time.time()})
                write_bytes(self.fs, self.path, renewed.to_bytes())
                self._record = renewed
            except _RENEW_ERRORS as error:  # a missed beat; the expiry allows several
                logger.warning("could not renew the lease on %s: %s", self.uri, error)

    def _refusal(self, holder: LeaseRecord | None) -> LeaseHeld:
        who = holder.describe() if holder else "another writer"
        expiry = f"{holder.expires_after_s:.0f} s" if holder else "its expiry"
        return LeaseHeld(
            f"the output {self.uri} is being written by {who}. Two writers would render the same rows and "
            "remove each other's unfinished files, so this command stops. Wait for that job to finish, or "
            "write to another output. A writer that died is taken over by a plain rerun: at once when it "
            f"ran on this host, otherwise once its heartbeat is older than {expiry}; --takeover forces "
            "it now (only when you know it is dead: if it still runs, rows are rendered twice and files "
            "it has not committed yet are removed)."
        )


def describe_writer(fs: AbstractFileSystem, root: str) -> str | None:
    """A line for readers when a job holds the output's lease (None when none does)."""
    try:
        fs.invalidate_cache(join(root, LEASE_FILE))
        data: bytes = fs.cat_file(join(root, LEASE_FILE))
    except _READ_ERRORS:
        return None
    record = LeaseRecord.parse(data)
    if record is None:
        return None
    now = time.time()
    stale = stale_reason(record, now)
    if stale:
        return f"a lease left by {record.describe(now)} is stale ({stale}); the next writer takes it over"
    return f"a job is writing this output: {record.describe(now)}; figures may change while it runs"

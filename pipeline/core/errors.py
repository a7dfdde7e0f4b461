"""Errors a user can act on: each says what was wrong, where, and what to do.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

import re
from collections.abc import Iterator


class SdxlBatchError(Exception):
    """Base class of every error caused by the user's input or environment."""

    exit_code = 2  # the CLI's exit status: 2 for a problem that stops any job (see `BadRows`)


class ConfigError(SdxlBatchError):
    """The YAML config or a command-line override is invalid."""


class ManifestError(SdxlBatchError):
    """The manifest is missing, unreadable or has bad columns or rows."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, column: str | None = None):
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"row {row}" if row is not None else "",
                f"column {column!r}" if column else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.row, self.column = file, row, column


class BadRows(ManifestError):
    """Rows of the manifest that a job with `on_bad_row: fail` refuses: exit status 1, as
    `validate` reports them ("NOT READY"), where a structural problem exits 2."""

    exit_code = 1


class StorageError(SdxlBatchError):
    """A location cannot be read or written (missing bucket, no credentials, permission denied)."""


class LeaseHeld(StorageError):
    """Another writer holds the output's lease (`output.lease`): one writer per output."""


class ModelError(SdxlBatchError):
    """A model preset or its weights cannot be resolved or loaded."""


class WorkerDiedError(SdxlBatchError):
    """A worker process (a generator actor, a read/encode/write task) died more often than
    `resources.max_retries` allows: a crash that repeats rather than a lost node."""


class PlacementError(SdxlBatchError):
    """No node of the cluster can run a generator actor, for longer than `resources.wait_for_nodes_s`:
    the nodes that could were lost or preempted and none replaced them."""


class ClusterError(SdxlBatchError):
    """The cluster could not be reached, refused us, or does not know the job."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it wraps, each once, depth first: a Ray task error's original
    exception (`.cause`) first, then `__cause__` and `__context__`."""
    seen: set[int] = set()
    stack: list[object] = [error]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend([current.__context__, current.__cause__, getattr(current, "cause", None)])


# The last line of a formatted traceback: `[module path.]ClassName: message`.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w+Error): ", re.MULTILINE)


def error_types() -> dict[str, type[SdxlBatchError]]:
    """Every error type of ours by class name; the names are unique (all live in this module)."""
    found: dict[str, type[SdxlBatchError]] = {}
    stack: list[type[SdxlBatchError]] = [SdxlBatchError]
    while stack:
        kind = stack.pop()
        found[kind.__name__] = kind
        stack.extend(kind.__subclasses__())
    return found


def error_from_text(text: str) -> SdxlBatchError | None:
    """Our error at the end of a traceback kept only as text (Ray keeps just the text of an
    exception raised in an actor's constructor). The class name is the marker: the module path
    it is printed with does not matter, so moving a module cannot break this silently."""
    kinds = error_types()
    for match in reversed(list(_ERROR_LINE.finditer(text))):
        kind = kinds.get(match.group(1))
        if kind is None:
            continue
        message = text[match.end() :].split("\nFailed to apply UDF transform")[0].strip()
        # ManifestError's constructor formats a location: rebuild it as the plain message it became.
        return SdxlBatchError(message) if kind is ManifestError else kind(message)
    return None

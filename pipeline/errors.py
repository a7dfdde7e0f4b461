"""Errors a user can act on: each says what was wrong, where, and what to do.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterator


class SdxlBatchError(Exception):
    """Base class of every error caused by the user's input or environment."""


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


class StorageError(SdxlBatchError):
    """A location cannot be read or written (missing bucket, no credentials, permission denied)."""


class ModelError(SdxlBatchError):
    """A model preset or its weights cannot be resolved or loaded."""


class WorkerDiedError(SdxlBatchError):
    """A worker process (a generator actor, a read/encode/write task) died more often than
    `resources.max_retries` allows: a crash that repeats rather than a lost node."""


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

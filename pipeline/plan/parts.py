"""Committed parts that cannot be read.

A metadata part is the ledger of its rows: once committed it must read. One can still be damaged:
zero bytes or truncated after a power loss on a disk that lost what was not yet on it (commits are
fsynced since, `core.io.write_bytes`), or a file copied or edited by hand. Such a part is named
with its reason by the planner (`plan.rows.read_done`) and by `verify`; `run` moves it aside to
`damaged/` (`move_aside`): its rows are pending again and rendered by the same run, and its files,
which no committed part lists any more, are removed as orphans at the job's end. Exactly-once
holds: a row is done when a readable committed part lists it.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.io import join
from pipeline.core.layout import DAMAGED_DIR

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# What reading a committed part raises when the part itself is damaged (zero bytes after a power
# loss, truncated, not Parquet): ArrowInvalid for a bad footer, OSError for a short read.
DAMAGE_ERRORS: tuple[type[Exception], ...] = (pa.ArrowInvalid, OSError)


def read_part_ids(fs: AbstractFileSystem, paths: list[str]) -> tuple[pa.Table, list[tuple[str, str]]]:
    """The ids of committed parts, read one by one: (ids, [(path, why) for each damaged part]).
    A part removed meanwhile is an error, not damage: only one writer removes parts (`output.lease`)."""
    tables, damaged = [], []
    for path in paths:
        try:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=["id"]).cast(pa.schema([("id", pa.string())])))
        except FileNotFoundError:
            raise
        except DAMAGE_ERRORS as error:
            damaged.append((path, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))
    ids = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})
    return ids, damaged


def move_aside(fs: AbstractFileSystem, root: str, damaged: list[tuple[str, str]]) -> list[str]:
    """Move damaged committed parts to `damaged/`: their rows are pending again, their files
    orphans (removed at the job's end). Returns where they went. Only the lease holder calls this."""
    moved = []
    for path, _ in damaged:
        target = join(root, DAMAGED_DIR, posixpath.basename(path))
        fs.makedirs(join(root, DAMAGED_DIR), exist_ok=True)
        fs.mv(path, target)
        moved.append(target)
    return moved

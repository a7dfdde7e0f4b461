"""Turning row ids into object names that can never escape the output prefix.

Ids come from other teams' scripts: they may hold `/`, `..`, URL-encoded or look-alike
separators, control characters or thousands of characters. An id that is already a short run of
`[A-Za-z0-9._-]` (not starting with `.`) is used as is, so common ids stay readable; any other id
keeps a readable, sanitised prefix plus a hash of the original id, so two different ids can never
map to the same name. A readable id shaped like such a name (ending in `-` and 16 hex digits) is
hashed too, since it could otherwise take the name of another id (`a/b` and `a_b-<its hash>`).
"""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_HASHED_SHAPE = re.compile(r"(?:.*-)?[0-9a-f]{16}")  # every name `safe_name` builds from a hash
SHARD_HEX_DIGITS = 2


def id_digest(row_id: str) -> str:
    return hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()


def safe_name(row_id: str) -> str:
    """A file-name stem for `row_id`: no separators, no dot-only names, at most 120 characters."""
    if _SAFE.fullmatch(row_id) and ".." not in row_id and not _HASHED_SHAPE.fullmatch(row_id):
        return row_id
    readable = _UNSAFE_CHARS.sub("_", row_id)[:80].strip("_")
    digest = id_digest(row_id)[:16]
    return f"{readable}-{digest}" if readable else digest


def shard_of(row_id: str) -> str:
    """The image folder of a row: a fixed-width hex prefix of the id's hash.

    Hashing spreads objects evenly over prefixes (S3 scales request rates per prefix) and,
    unlike a batch number, does not depend on how rows were batched, so a retried row lands
    on the same key.
    """
    return id_digest(row_id)[:SHARD_HEX_DIGITS]


def image_relpath(row_id: str, ext: str) -> str:
    return f"images/{shard_of(row_id)}/{safe_name(row_id)}.{ext}"

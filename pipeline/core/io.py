"""One IO abstraction for every location: local paths, `file://` and `s3://` go through fsspec.

Business logic never talks to boto3; it asks `filesystem(uri, storage)` for an fsspec filesystem
and a path within it, so local disk and object storage run exactly the same code.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import fsspec

from pipeline.core.errors import StorageError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig

# Transient S3 failures (503 SlowDown, dropped connections) are retried by botocore itself;
# "adaptive" mode also rate-limits the client when the store asks it to slow down.
_S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}
# A local write's temporary file, next to its target: `.<name>.<32 hex>.tmp`. Hidden and ending in
# `.tmp`, so no glob of the final names (`metadata/*.parquet`, `shards/*.tar`) matches it, even
# after a kill leaves it behind. Earlier versions named it `.tmp-<32 hex>-<name>`, which still
# ended in the final extension: both shapes are recognised, so `verify --clean` removes either.
_TEMPORARY_NAME = re.compile(r"\.(?:.+\.[0-9a-f]{32}\.tmp|tmp-[0-9a-f]{32}-.+)", re.DOTALL)


def _storage_errors() -> tuple[type[Exception], ...]:
    """What reading or writing a location raises when the location is the problem: OSError (s3fs
    maps S3's answers to OSErrors, pyarrow's IO errors are OSErrors) and the errors botocore raises
    itself (missing credentials, a bad endpoint). Never ValueError: pyarrow's ArrowInvalid (a schema
    or cast bug) is one, and must surface as what it is."""
    errors: list[type[Exception]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # installed with s3fs; a local-only install has no S3 errors to catch
        pass
    return tuple(errors)


STORAGE_ERRORS = _storage_errors()


def is_remote(uri: str) -> bool:
    protocol = fsspec.core.split_protocol(uri)[0]
    return protocol not in (None, "file", "local")


def storage_options(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    """fsspec options for `uri`: only set fields are passed, so AWS's own defaults still apply."""
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol not in ("s3", "s3a") or storage is None:
        return {}
    options: dict[str, Any] = {"config_kwargs": {"retries": dict(_S3_RETRIES)}}
    if storage.anon:
        options["anon"] = True
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.key is not None:
        options["key"] = storage.key.get_secret_value()
    if storage.secret is not None:
        options["secret"] = storage.secret.get_secret_value()
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    return options


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem for `uri` and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, storage))
    except (ImportError, ValueError) as error:
        raise StorageError(f"cannot open location {uri!r}: {error}") from None
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path parts with `/`, which every fsspec filesystem (local included) accepts."""
    return posixpath.join(base.rstrip("/"), *parts) if parts else base


def full_uri(fs: AbstractFileSystem, path: str) -> str:
    """The URI a user can paste back into the CLI (`s3://bucket/key` or a local path)."""
    return fs.unstrip_protocol(path) if is_remote_fs(fs) else path


def is_remote_fs(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def temporary_path(path: str) -> str:
    """Where `write_bytes` writes a local file before renaming it to `path`."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")


def is_temporary_name(name: str) -> bool:
    """Whether a file name is a temporary file of `write_bytes` (or of an earlier version's)."""
    return bool(_TEMPORARY_NAME.fullmatch(name))


def fsync_folder(folder: str) -> None:
    """Make a folder's entries (a rename into it) durable: the rename of a file whose data is on
    disk can itself be lost at a power loss until its folder is synced."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_local(path: str, data: bytes) -> None:
    """A file's bytes on disk under a temporary name, then renamed to `path` (not yet durable:
    its folder still needs `fsync_folder`)."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object, atomically and durably. An object-store PUT is both; a local file is
    written under a temporary name, fsynced, renamed into place, and its folder fsynced.

    Atomicity matters because readers (resume, verify) treat a file's presence as complete, and
    durability because a commit that a power loss can undo (a renamed metadata part left empty)
    would stop every resume. A local write killed before its rename leaves its temporary file
    (`temporary_path`), which no glob of the final names matches; `sdxl-batch verify --clean`
    removes it. s3fs makes no temporary objects: an object appears when its PUT, or the
    completion of its multipart upload (100 MiB and more), succeeds.
    """
    if is_remote_fs(fs):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_local(path, data)
    fsync_folder(os.path.dirname(path))


def write_files(fs: AbstractFileSystem, targets: dict[str, bytes]) -> None:
    """Write many objects (a part's images) as `write_bytes` writes one: concurrent PUTs on an
    object store; locally each through a temporary file and a rename, then each folder fsynced once."""
    if is_remote_fs(fs):
        fs.pipe(targets)  # s3fs uploads these concurrently
        return
    folders = {os.path.dirname(path) for path in targets}
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    for path, data in targets.items():
        _write_local(path, data)
    for folder in sorted(folders):
        fsync_folder(folder)


@contextmanager
def open_atomic(fs: AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A file to stream a large object into, which appears under `path` only when the block
    ends without an error: local files through a temporary and a rename (as `write_bytes`), an
    object store's multipart upload, which completes when the file is closed."""
    if is_remote_fs(fs):
        remote = fs.open(path, "wb")
        try:
            yield remote
        except BaseException:
            # fsspec's own `with` would close, so commit, a partial object: abort the upload.
            if hasattr(remote, "discard"):
                remote.discard()
            remote.closed = True
            raise
        remote.close()
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    data: bytes = fs.cat_file(path)
    return data

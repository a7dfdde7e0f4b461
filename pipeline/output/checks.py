"""`verify`'s work as tasks that run where the data is (`plan.executor`, as planning does).

At 100 million rows an output has some 200,000 parts and as many tars or 100 million images:
reading and hashing them is the whole cost of `verify`, and on one driver it takes hours (Python's
`tarfile` alone parses some 30,000 members a second on a core). So the checks run in three waves
of tasks, each given a few paths and returning small records and Arrow tables the driver never
opens; the driver holds a path per part and the problems found (a count and the first few of each
kind), never a value per row:

1. `check_parts`, one task per group of committed parts: reads each part (its schema, rows, ids
   and image references), checks its images (exists, size, and sha256 of all or a random
   `sample` of them), and splits the ids into P hash partitions (`core.partition`). A part that
   cannot be read is named, not raised (`plan.parts`).
2. `manifest_partitions`, one task per manifest file (`verify --manifest`): its ids, each flagged
   where rejects/ lists its row, split the same way.
3. `join_ids`, one task per partition: duplicate ids, and the manifest's ids against the
   output's. The same id lands in the same partition whoever read it, so each join sees all its
   copies.

The files layout's image paths (one per row) come back per group of parts for the orphan check
(`output.orphans`), which the driver spills to local disk as they arrive.
"""

from __future__ import annotations

import hashlib
import heapq
import posixpath
import struct
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.io import filesystem, join
from pipeline.core.partition import split_by_partition
from pipeline.output.manifest_ids import ManifestFile, manifest_ids
from pipeline.output.streaming import bounded_map
from pipeline.plan.parts import DAMAGE_ERRORS

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig

MAX_LISTED = 10
PART_THREADS = 8  # parts (and their images) read at once within a task: object stores answer in parallel
_COLUMNS = ["id", "image_path", "tar_member", "sha256", "bytes"]
_CHUNK = 1 << 20  # bytes hashed at once from a tar member
_ID_SCHEMA = pa.schema([("id", pa.string())])
_PATH_SCHEMA = pa.schema([("path", pa.string())])
_MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("rejected", pa.bool_())])

# Problem kinds, in the order the summary lists them.
DUPLICATE = "duplicate id"
UNREADABLE_TAR = "unreadable tar shard"
IMAGE_MISSING = "image missing"
IMAGE_MISMATCH = "image sha256 or size mismatch"
MANIFEST_MISSING = "manifest id missing from the output"
NOT_IN_MANIFEST = "output id not in the manifest"
ORDER = [DUPLICATE, UNREADABLE_TAR, IMAGE_MISSING, IMAGE_MISMATCH, MANIFEST_MISSING, NOT_IN_MANIFEST]


class Findings:
    """Problems found part by part or partition by partition: per kind, how many, and the
    MAX_LISTED smallest items, so a broken output costs no more memory than a sound one."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.shown: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, items: Iterable[Any], count: int | None = None) -> None:
        listed = [str(item) for item in items]
        self.counts[kind] += len(listed) if count is None else count
        self.shown[kind] = heapq.nsmallest(MAX_LISTED, [*self.shown[kind], *listed])

    def merge(self, other: Findings) -> None:
        for kind, count in other.counts.items():
            self.add(kind, other.shown[kind], count=count)


# ---- wave 1: the parts and their images ------------------------------------------------------


@dataclass
class PartsCheck:
    """What a group of parts tells the driver: O(parts), whatever their rows."""

    rows: int = 0
    readable: list[str] = field(default_factory=list)  # the parts that read, in order
    schemas: list[tuple[pa.Schema, list[str]]] = field(default_factory=list)  # distinct, with their parts' names
    damaged: list[str] = field(default_factory=list)  # "name (why)"
    sized: int = 0  # images checked for presence and size
    hashed: int = 0  # of which the sha256 too
    tars: set[str] = field(default_factory=set)
    findings: Findings = field(default_factory=Findings)

    def add_schema(self, schema: pa.Schema, name: str) -> None:
        for known, names in self.schemas:
            if known.equals(schema):
                names.append(name)
                return
        self.schemas.append((schema, [name]))


@dataclass
class _Part:
    schema: pa.Schema
    ids: pa.ChunkedArray
    images: pa.ChunkedArray  # the files layout's image paths
    tars: set[str]
    sized: int
    hashed: int
    findings: Findings


def check_parts(
    output: str, storage: StorageConfig | None, paths: list[str], sample: float, seed: int, partitions: int
) -> tuple[Any, ...]:
    """Check a group of committed parts (paths under `output`): a `PartsCheck`, the files
    layout's image paths (one table), then the parts' ids split into `partitions` tables."""
    fs, root = filesystem(output, storage)
    check = PartsCheck()
    ids: list[pa.Array] = []
    images: list[pa.Array] = []
    read = partial(_check_part, fs, root, sample=sample, seed=seed)
    for path, part in zip(paths, bounded_map(read, paths, threads=PART_THREADS), strict=True):
        name = posixpath.basename(path)
        if isinstance(part, str):
            check.damaged.append(f"{name} ({part})")
            continue
        check.readable.append(path)
        check.add_schema(part.schema, name)
        check.rows += len(part.ids)
        check.sized += part.sized
        check.hashed += part.hashed
        check.tars |= part.tars
        check.findings.merge(part.findings)
        ids.extend(part.ids.chunks)
        images.extend(part.images.chunks)
    id_table = pa.table([pa.chunked_array(ids, pa.string())], schema=_ID_SCHEMA)
    image_table = pa.table([pa.chunked_array(images, pa.string()).combine_chunks()], schema=_PATH_SCHEMA)
    return (check, image_table, *split_by_partition(id_table, "id", partitions))


def _check_part(fs: AbstractFileSystem, root: str, path: str, *, sample: float, seed: int) -> _Part | str:
    """One part read and its images checked; a part that cannot be read: why, in a line."""
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow.remove_metadata()
            present = [c for c in _COLUMNS if c in schema.names]
            table = parquet.read(columns=present)
    except FileNotFoundError:
        raise
    except DAMAGE_ERRORS as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    for name in _COLUMNS:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    hashed = _sampled(table.num_rows, sample, seed, posixpath.basename(path))
    table = table.append_column("hash", pa.array(hashed, pa.bool_()))
    members = table.column("tar_member")
    in_tar = pc.fill_null(pc.and_(pc.is_valid(members), pc.not_equal(members, "")), False)
    files, tars = table.filter(pc.invert(in_tar)), table.filter(in_tar)
    findings = Findings()
    _check_files(fs, root, files.to_pylist(), findings)
    _check_tars(fs, root, tars.to_pylist(), findings)
    return _Part(
        schema=schema,
        ids=pc.cast(table.column("id"), pa.string()),
        images=pc.drop_null(files.column("image_path")),
        tars=set(tars.column("image_path").to_pylist()),
        sized=table.num_rows,
        hashed=int(hashed.sum()),
        findings=findings,
    )


def _sampled(rows: int, sample: float, seed: int, name: str) -> np.ndarray:
    """Which of a part's rows get their sha256 checked: all, or a random `sample` of them (the
    run's `seed` and the part's name pick them: the same ones on a task's retry)."""
    if sample >= 1.0:
        return np.ones(rows, dtype=bool)
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).random(rows) < sample


def _fingerprint(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def _stream_fingerprint(handle: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _check_files(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]], findings: Findings) -> None:
    """The files layout: each image read and hashed, or (not sampled) only its size looked up."""
    missing, wrong = [], []
    for row in rows:
        path = join(root, row["image_path"])
        try:
            if row["hash"]:
                good = _fingerprint(fs.cat_file(path)) == (row["sha256"], row["bytes"])
            else:
                good = fs.size(path) == row["bytes"]
        except FileNotFoundError:
            missing.append(row["id"])
            continue
        if not good:
            wrong.append(row["id"])
    findings.add(IMAGE_MISSING, missing)
    findings.add(IMAGE_MISMATCH, wrong)


def _check_tars(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]], findings: Findings) -> None:
    by_tar: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_tar[row["image_path"]].append(row)
    missing: list[str] = []
    wrong: list[str] = []
    for tar_path, members in by_tar.items():
        try:
            found = _tar_fingerprints(fs, join(root, tar_path), {r["tar_member"]: r["hash"] for r in members})
        except FileNotFoundError:
            missing.extend(r["id"] for r in members)
            continue
        except tarfile.TarError:
            findings.add(UNREADABLE_TAR, [tar_path])
            wrong.extend(r["id"] for r in members)
            continue
        for row in members:
            got = found.get(row["tar_member"])
            if got is None:
                missing.append(row["id"])
            elif got != ((row["sha256"] if row["hash"] else None), row["bytes"]):
                wrong.append(row["id"])
    findings.add(IMAGE_MISSING, missing)
    findings.add(IMAGE_MISMATCH, wrong)


def _tar_fingerprints(fs: AbstractFileSystem, path: str, wanted: dict[str, bool]) -> dict[str, tuple[str | None, int]]:
    """Each `wanted` member's (sha256, size), the sha256 only where `wanted` says so (else None:
    the header's size is enough). The tar is read as a stream, a member at a time (a shard can be
    gigabytes). A name held twice counts as its last copy, as extraction would."""
    with fs.open(path, "rb") as handle:
        try:
            return _scan_tar(handle, wanted)
        except _UnusualTar:  # a member type a shard never holds: the standard library's reader
            handle.seek(0)
            return _scan_tar_slowly(handle, wanted)


class _UnusualTar(Exception):
    """A tar that `_scan_tar` leaves to `tarfile` (sparse members, multi-volume, ...)."""


_BLOCK = 512
_EMPTY = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGTYPE, AREGTYPE, CONTTYPE
_LINKS_AND_FOLDERS = (b"1", b"2", b"3", b"4", b"5", b"6")
_GNU_LONG = (b"L", b"K")  # a long name or link name in the next member's place
_PAX = (b"x", b"g")


def _scan_tar(handle: IO[bytes], wanted: dict[str, bool]) -> dict[str, tuple[str | None, int]]:
    """`tarfile`'s stream reading (`mode="r|"`) of the ustar, GNU and pax headers that tar
    writers produce, without its per-member objects: Python's `tarfile` parses some 30,000 headers
    a second on a core, which made the tars nearly all of `verify`'s time; this reads 5-10 times
    more. Checksums are checked and a cut-off member is an error, as `tarfile` has them
    (tests/output/test_tar_scan.py holds it to `tarfile`'s answers)."""
    found: dict[str, tuple[str | None, int]] = {}
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        header = handle.read(_BLOCK)
        if len(header) < _BLOCK or header == _EMPTY:
            if (first and len(header) < _BLOCK) or header.strip(b"\0") or long_name is not None or pax:
                raise tarfile.ReadError("empty file" if not header and first else "unexpected end of data")
            return found
        first = False
        _check_sum(header)
        kind = header[156:157]
        size = _tar_number(header[124:136])
        if kind in _GNU_LONG or kind in _PAX:
            data = _read_exactly(handle, size + (-size % _BLOCK))[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data)
            continue
        if kind not in _REGULAR and kind not in _LINKS_AND_FOLDERS:
            raise _UnusualTar(kind)
        if "size" in pax:
            size = int(pax["size"])
        if any(key.startswith("GNU.sparse") for key in pax):
            raise _UnusualTar("sparse")
        name = pax.get("path") or long_name or _ustar_name(header, kind)
        long_name, pax = None, {}
        padded = size + (-size % _BLOCK)
        if kind in _LINKS_AND_FOLDERS:  # no data follows a link or a folder's header
            continue
        if kind == b"\0" and name.endswith("/"):  # an old tar's folder
            _skip(handle, padded)
            continue
        if wanted.get(name):
            digest = hashlib.sha256()
            left = size
            while left:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                digest.update(chunk)
                left -= len(chunk)
            _skip(handle, padded - size)
            found[name] = (digest.hexdigest(), size)
        else:
            _skip(handle, padded)
            if name in wanted:
                found[name] = (None, size)


def _check_sum(header: bytes) -> None:
    stored = _tar_number(header[148:156])
    unsigned = 256 + sum(header) - sum(header[148:156])
    if stored != unsigned:
        signed = 256 + sum(struct.unpack_from("148b8x356b", header))
        if stored != signed:
            raise tarfile.ReadError("bad checksum")


def _tar_number(field: bytes) -> int:
    """A header's number: octal text, or GNU's base-256 for large values."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("invalid header") from None


def _ustar_name(header: bytes, kind: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0]
    if kind == b"5":
        name = name.rstrip("/")
    if prefix:
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name


def _pax_records(data: bytes) -> dict[str, str]:
    """The key=value records of a pax extended header ("<length> <key>=<value>\\n" each)."""
    records: dict[str, str] = {}
    position = 0
    try:
        while position < len(data) and data[position : position + 1] not in (b"\0", b""):
            space = data.index(b" ", position)
            length = int(data[position:space])
            key, _, value = data[space + 1 : position + length - 1].partition(b"=")
            records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            position += length
    except ValueError:
        raise tarfile.ReadError("invalid pax header") from None
    return records


def _read_exactly(handle: IO[bytes], size: int) -> bytes:
    data = handle.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(handle: IO[bytes], size: int) -> None:
    """Read past `size` bytes (read, not seek: a cut-off member must be an error)."""
    while size:
        chunk = handle.read(min(_CHUNK, size))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        size -= len(chunk)


def _scan_tar_slowly(handle: IO[bytes], wanted: dict[str, bool]) -> dict[str, tuple[str | None, int]]:
    found: dict[str, tuple[str | None, int]] = {}
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if info.name not in wanted or not info.isfile():
                continue
            member = tar.extractfile(info) if wanted[info.name] else None
            found[info.name] = _stream_fingerprint(member) if member is not None else (None, info.size)
    return found


# ---- wave 2: the manifest's ids --------------------------------------------------------------


def manifest_partitions(
    files: list[ManifestFile],
    storage: StorageConfig | None,
    rejects: list[list[str]],
    output: str,
    partitions: int,
    images: int = 1,
) -> tuple[Any, ...]:
    """A group of manifest files' ids, each flagged where one of its `rejects` files (under
    `output`) lists its row: the count of rejected rows, then `partitions` tables of (id, rejected).
    With `images` N (`images_per_prompt`), each row's N image ids, all flagged where its row is."""
    chunks = []
    rejected_rows = 0
    for file, named in zip(files, rejects, strict=True):
        manifest_fs, _ = filesystem(file.uri, storage)
        rejected = _rejected_rows(output, storage, named, file)
        rejected_rows += len(rejected)
        for chunk in manifest_ids(manifest_fs, [file], images):
            rows = np.repeat(np.arange(chunk.row_offset, chunk.row_offset + len(chunk.ids) // images), images)
            flags = np.isin(rows, rejected, assume_unique=True) if len(rejected) else np.zeros(len(rows), dtype=bool)
            chunks.append(pa.table({"id": chunk.ids, "rejected": flags}, schema=_MANIFEST_SCHEMA))
    table = pa.concat_tables(chunks) if chunks else _MANIFEST_SCHEMA.empty_table()
    return (rejected_rows, *split_by_partition(table, "id", partitions))


def _rejected_rows(output: str, storage: StorageConfig | None, rejects: list[str], file: ManifestFile) -> np.ndarray:
    """The rows of `file` that rejects/ lists (skipped by the job, so not missing), sorted."""
    fs, _ = filesystem(output, storage)
    rows = [np.empty(0, np.int64)]
    for path in rejects:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["file", "row"])
        table = table.filter(pc.equal(table.column("file"), file.uri))
        rows.append(np.asarray(pc.drop_null(table.column("row")).to_numpy(), dtype=np.int64))
    found = np.unique(np.concatenate(rows))
    return found[(found >= 0) & (found < file.rows)]


def rejects_naming(fs: AbstractFileSystem, paths: list[str]) -> dict[str, list[str]]:
    """Which of the rejects files (`paths`) name each manifest file (by its uri)."""
    sources: dict[str, list[str]] = defaultdict(list)

    def files_named(path: str) -> list[str]:
        with fs.open(path, "rb") as handle:
            return [f for f in pc.unique(pq.read_table(handle, columns=["file"]).column("file")).to_pylist() if f]

    for path, files in zip(paths, bounded_map(files_named, paths), strict=True):
        for file in files:
            sources[file].append(path)
    return sources


# ---- wave 3: the joins -----------------------------------------------------------------------


def join_ids(output_tables: int, with_manifest: bool, *tables: pa.Table) -> Findings:
    """One partition: `output_tables` tables of the output's ids, then (`with_manifest`) the
    manifest's (id, rejected). Duplicates among the output's ids; with the manifest, the ids
    missing on either side."""
    findings = Findings()
    ids = pa.chunked_array([t.column("id") for t in tables[:output_tables]], pa.string())
    counts = pc.value_counts(ids)
    findings.add(DUPLICATE, pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist())
    if not with_manifest:
        return findings
    manifest = pa.concat_tables(tables[output_tables:]) if len(tables) > output_tables else None
    manifest = manifest if manifest is not None else _MANIFEST_SCHEMA.empty_table()
    present = counts.field("values")
    wanted = manifest.column("id").combine_chunks()
    missing = pc.and_(pc.invert(manifest.column("rejected")), pc.invert(pc.is_in(wanted, value_set=present)))
    findings.add(MANIFEST_MISSING, pc.filter(wanted, missing).to_pylist())
    findings.add(NOT_IN_MANIFEST, pc.filter(present, pc.invert(pc.is_in(present, value_set=wanted))).to_pylist())
    return findings


# ---- handles, by name ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckHandles:
    """Handles to what `check_parts` returns, by name."""

    summary: Any  # PartsCheck
    images: Any  # the files layout's image paths
    partitions: list[Any]  # id tables, one per partition

    @classmethod
    def of(cls, handles: list[Any]) -> CheckHandles:
        return cls(handles[0], handles[1], handles[2:])


@dataclass(frozen=True)
class ManifestHandles:
    """Handles to what `manifest_partitions` returns, by name."""

    rejected: Any  # int
    partitions: list[Any]  # (id, rejected) tables, one per partition

    @classmethod
    def of(cls, handles: list[Any]) -> ManifestHandles:
        return cls(handles[0], handles[1:])

"""`sdxl-batch verify`: check an output against the exactly-once contract.

Every metadata row must point to an image that exists and whose sha256 and size match; no id
may appear twice; every metadata part must have the same schema (readers glob them); with a
manifest, every manifest id must be present and no other. Objects that no committed part lists
(images, tars, stats records, temporary files of interrupted writes) are orphans of interrupted
parts (`output.orphans`): counted and reported, never counted as output; `clean` removes them.

Scale: memory stays bounded whatever the output's size (`output.streaming`). The parts are read
once, 16 at a time; each part's images (or tar members) are checked as it is read, and only the
problems found are kept (a count and the first few of each kind). Ids, manifest ids and image
paths go to local temporary files split into partitions, and duplicates, the manifest's ids
against the output's, and the image listing against the metadata are each joined a partition
at a time.
"""

from __future__ import annotations

import hashlib
import heapq
import posixpath
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.io import filesystem, is_temporary_name, join
from pipeline.core.layout import REJECTS_DIR, committed_parts
from pipeline.output.lease import OutputLease, describe_writer
from pipeline.output.manifest_ids import ManifestFile, manifest_files, manifest_ids
from pipeline.output.orphans import Orphans, find_orphans, remove_orphans
from pipeline.output.streaming import ImageReferences, PartitionedSpill, bounded_map, partitions_for, read_columns
from pipeline.plan.parts import DAMAGE_ERRORS

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig

MAX_LISTED = 10
_COLUMNS = ["id", "image_path", "tar_member", "sha256", "bytes"]
_CHUNK = 1 << 20  # bytes hashed at once from a tar member
# Problem kinds in the order the summary lists them.
SCHEMA_PROBLEM = "metadata part with another schema than"
DAMAGED_PROBLEM = (
    "damaged committed part (cannot be read; `sdxl-batch run` moves it aside to damaged/ and renders its rows again)"
)
DUPLICATE = "duplicate id"
UNREADABLE_TAR = "unreadable tar shard"
IMAGE_MISSING = "image missing"
IMAGE_MISMATCH = "image sha256 or size mismatch"
MANIFEST_MISSING = "manifest id missing from the output"
NOT_IN_MANIFEST = "output id not in the manifest"
_ORDER = [DUPLICATE, UNREADABLE_TAR, IMAGE_MISSING, IMAGE_MISMATCH, MANIFEST_MISSING, NOT_IN_MANIFEST]


@dataclass
class VerifyReport:
    rows: int = 0
    parts: int = 0
    checked_images: int = 0
    orphans: Orphans = field(default_factory=Orphans)
    cleaned: bool = False
    manifest_rows: int | None = None
    rejected_rows: int = 0
    problems: list[str] = field(default_factory=list)
    writer: str | None = None  # a job holding the output's lease while this ran (`describe_writer`)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, items: list[str]) -> None:
        self.add_counted(kind, len(items), items[:MAX_LISTED])

    def add_counted(self, kind: str, count: int, shown: list[str]) -> None:
        """A problem found `count` times, of which `shown` are listed."""
        if count:
            more = f" (+{count - len(shown)} more)" if count > len(shown) else ""
            self.problems.append(f"{kind} ({count}): {', '.join(shown)}{more}")

    def summary(self) -> str:
        lines = [f"note: {self.writer}"] if self.writer else []
        lines += [
            f"rows in metadata: {self.rows} in {self.parts} parts",
            f"images checked:   {self.checked_images} (sha256 and size)",
            f"orphans:          {self.orphans.describe()}: from interrupted parts, not counted"
            + ("; removed" if self.cleaned else "; `verify --clean` removes them" if self.orphans.count else ""),
        ]
        if self.manifest_rows is not None:
            lines.append(f"manifest rows:    {self.manifest_rows}")
            lines.append(f"rejected rows:    {self.rejected_rows} (listed in rejects/ with their reason; not rendered)")
        lines.append("OK: every row exactly once" if self.ok else "PROBLEMS:")
        lines.extend(f"  - {problem}" for problem in self.problems)
        return "\n".join(lines)


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

    def report_to(self, report: VerifyReport) -> None:
        for kind in sorted(self.counts, key=lambda k: _ORDER.index(k) if k in _ORDER else -1):
            report.add_counted(kind, self.counts[kind], self.shown[kind])


def _fingerprint(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def _stream_fingerprint(handle: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _read_fingerprint(fs: Any, path: str) -> tuple[str, int] | None:
    try:
        return _fingerprint(fs.cat_file(path))
    except FileNotFoundError:
        return None


@dataclass
class _Part:
    """What one part contributes: its ids and the files layout's image paths (to spill), its
    tars, and the problems its images have."""

    ids: pa.ChunkedArray
    images: pa.ChunkedArray
    tars: set[str]
    findings: Findings


def _check_part(fs: AbstractFileSystem, root: str, path: str) -> _Part:
    table = read_columns(fs, path, _COLUMNS)
    members = table.column("tar_member")
    in_tar = pc.fill_null(pc.and_(pc.is_valid(members), pc.not_equal(members, "")), False)
    files, tars = table.filter(pc.invert(in_tar)), table.filter(in_tar)
    findings = Findings()
    _check_files(fs, root, files.to_pylist(), findings)
    _check_tars(fs, root, tars.to_pylist(), findings)
    return _Part(table.column("id"), files.column("image_path"), set(tars.column("image_path").to_pylist()), findings)


def _check_files(fs: AbstractFileSystem, root: str, rows: list[dict[str, Any]], findings: Findings) -> None:
    missing, wrong = [], []
    for row in rows:
        got = _read_fingerprint(fs, join(root, row["image_path"]))
        if got is None:
            missing.append(row["id"])
        elif got != (row["sha256"], row["bytes"]):
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
            found = _tar_fingerprints(fs, join(root, tar_path), {r["tar_member"] for r in members})
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
            elif got != (row["sha256"], row["bytes"]):
                wrong.append(row["id"])
    findings.add(IMAGE_MISSING, missing)
    findings.add(IMAGE_MISMATCH, wrong)


def _tar_fingerprints(fs: AbstractFileSystem, path: str, wanted: set[str]) -> dict[str, tuple[str, int]]:
    """The fingerprint of each `wanted` member, the tar read as a stream (a member at a time: a
    shard can be gigabytes). A name held twice counts as its last copy, as extraction would."""
    found: dict[str, tuple[str, int]] = {}
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if info.name in wanted and info.isfile():
                member = tar.extractfile(info)
                if member is not None:
                    found[info.name] = _stream_fingerprint(member)
    return found


def _footers(fs: AbstractFileSystem, paths: list[str], report: VerifyReport) -> list[str]:
    """Row counts, and every part's schema against the first's: globbing readers (DuckDB,
    Polars, pyarrow, Hugging Face) drop columns or fail on parts that differ. Returns the parts
    that read; the others are reported as damaged (`plan.parts`)."""

    def footer(path: str) -> tuple[pa.Schema, int] | str:
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.read_metadata(handle)
        except FileNotFoundError:
            raise
        except DAMAGE_ERRORS as error:
            return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return metadata.schema.to_arrow_schema().remove_metadata(), metadata.num_rows

    first: pa.Schema | None = None
    differ: list[str] = []
    damaged: list[str] = []
    readable: list[str] = []
    for path, found in zip(paths, bounded_map(footer, paths), strict=True):
        if isinstance(found, str):
            damaged.append(f"{posixpath.basename(path)} ({found})")
            continue
        schema, rows = found
        first = schema if first is None else first
        report.rows += rows
        readable.append(path)
        if not schema.equals(first):
            differ.append(posixpath.basename(path))
    report.parts = len(readable)
    report.add(DAMAGED_PROBLEM, damaged)
    if readable:
        report.add(f"{SCHEMA_PROBLEM} {posixpath.basename(readable[0])}", differ)
    return readable


class _RejectedRows:
    """The manifest rows rejects/ lists (file, row): skipped, so not missing. Held for one
    manifest file at a time, as the manifest's ids stream past in file order."""

    def __init__(self, fs: AbstractFileSystem, root: str):
        self.fs = fs
        self.sources: dict[str, list[str]] = defaultdict(list)  # manifest file -> rejects files naming it
        folder = join(root, REJECTS_DIR)
        paths = [p for p in (fs.find(folder) if fs.exists(folder) else []) if _is_rejects_file(p)]
        for path, files in zip(paths, bounded_map(self._files_named, paths), strict=True):
            for file in files:
                self.sources[file].append(path)
        self._current: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self.count = 0

    def _files_named(self, path: str) -> list[str]:
        with self.fs.open(path, "rb") as handle:
            return [f for f in pc.unique(pq.read_table(handle, columns=["file"]).column("file")).to_pylist() if f]

    def rows(self, index: int, file: ManifestFile) -> np.ndarray:
        """The rejected rows of manifest file `index` (sorted, within the file's rows)."""
        if self._current[0] != index:
            rows = [np.empty(0, np.int64)]
            for path in self.sources.get(file.uri, []):
                with self.fs.open(path, "rb") as handle:
                    table = pq.read_table(handle, columns=["file", "row"])
                table = table.filter(pc.equal(table.column("file"), file.uri))
                rows.append(np.asarray(pc.drop_null(table.column("row")).to_numpy(), dtype=np.int64))
            found = np.unique(np.concatenate(rows))
            found = found[(found >= 0) & (found < file.rows)]
            self._current = (index, found)
            self.count += len(found)
        return self._current[1]


def _is_rejects_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith((".", "_")) and not is_temporary_name(name)


_ID_SCHEMA = pa.schema([("id", pa.string())])
_MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("rejected", pa.bool_())])


def _spill_manifest(
    fs: AbstractFileSystem,
    files: list[ManifestFile],
    rejects: _RejectedRows,
    spill: PartitionedSpill,
    report: VerifyReport,
) -> None:
    """Every manifest id (`fs`: the manifest's filesystem), flagged where rejects/ lists its
    row, into `spill`."""
    for chunk in manifest_ids(fs, files):
        rejected = rejects.rows(chunk.file, files[chunk.file])
        rows = np.arange(chunk.row_offset, chunk.row_offset + len(chunk.ids))
        flags = np.isin(rows, rejected, assume_unique=True) if len(rejected) else np.zeros(len(rows), dtype=bool)
        spill.append(pa.table({"id": chunk.ids, "rejected": flags}, schema=_MANIFEST_SCHEMA))
    spill.close()
    report.manifest_rows = sum(f.rows for f in files)
    report.rejected_rows = rejects.count


def _join_partition(ids: pa.Array, manifest: pa.Table | None, findings: Findings) -> None:
    """Duplicates among one partition's output ids; with the manifest's ids of the same
    partition, the ones missing on either side."""
    counts = pc.value_counts(ids)
    findings.add(DUPLICATE, pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist())
    if manifest is None:
        return
    present = pc.unique(ids)
    wanted = manifest.column("id").combine_chunks()
    missing = pc.and_(pc.invert(manifest.column("rejected")), pc.invert(pc.is_in(wanted, value_set=present)))
    findings.add(MANIFEST_MISSING, pc.filter(wanted, missing).to_pylist())
    findings.add(NOT_IN_MANIFEST, pc.filter(present, pc.invert(pc.is_in(present, value_set=wanted))).to_pylist())


def _orphans(
    fs: Any,
    root: str,
    report: VerifyReport,
    *,
    parts: set[str],
    tars: set[str],
    images: ImageReferences | None,
    clean: bool,
) -> None:
    report.orphans = find_orphans(fs, root, parts=parts, tars=tars, images=images)
    if clean and report.orphans.count:
        remove_orphans(fs, root, report.orphans)
        report.cleaned = True


def _scan_parts(
    fs: AbstractFileSystem, root: str, paths: list[str], *, scratch: str, partitions: int, report: VerifyReport,
    findings: Findings,
) -> tuple[PartitionedSpill, ImageReferences, set[str]]:  # fmt: skip
    """Read every part once, checking its images; spill its ids and image paths."""
    ids = PartitionedSpill.by_hash(join(scratch, "ids"), _ID_SCHEMA, key="id", partitions=partitions)
    images = ImageReferences(join(scratch, "images"))
    tars: set[str] = set()
    for part in bounded_map(lambda path: _check_part(fs, root, path), paths):
        ids.append(pa.table({"id": part.ids}))
        images.add(part.images)
        tars |= part.tars
        findings.merge(part.findings)
        report.checked_images += len(part.ids)
    ids.close()
    images.close()
    return ids, images, tars


def verify_output(
    output: str,
    *,
    manifest: str | None = None,
    storage: StorageConfig | None = None,
    clean: bool = False,
    takeover: bool = False,
) -> VerifyReport:
    """Check `output`; `clean`: also remove the objects of interrupted parts, holding the output's
    lease (a running job's uncommitted objects look the same: with a job writing, `clean` is
    refused). Without `clean` it reads without a lease, and says when a job is writing."""
    fs, root = filesystem(output, storage)
    if not clean:
        report = _verify(fs, root, output, manifest=manifest, storage=storage, clean=False)
        report.writer = describe_writer(fs, root)
        return report
    with OutputLease(fs, root, command="verify --clean", takeover=takeover):
        return _verify(fs, root, output, manifest=manifest, storage=storage, clean=True)


def _verify(
    fs: AbstractFileSystem, root: str, output: str, *, manifest: str | None, storage: StorageConfig | None, clean: bool
) -> VerifyReport:
    fs.invalidate_cache()  # fresh listings: orphans are what no committed part lists (output.orphans)
    report = VerifyReport()
    paths = committed_parts(fs, root)
    if not paths:  # a job killed before its first commit may still have left objects
        report.problems.append(f"no metadata under {output} (nothing committed yet)")
        _orphans(fs, root, report, parts=set(), tars=set(), images=None, clean=clean)
        return report
    paths = _footers(fs, paths, report)
    manifest_fs, files = manifest_files(manifest, storage) if manifest is not None else (fs, [])
    partitions = partitions_for(max(report.rows, sum(f.rows for f in files)))
    findings = Findings()
    with tempfile.TemporaryDirectory(prefix="sdxl-batch-verify-") as scratch:
        ids, images, tars = _scan_parts(
            fs, root, paths, scratch=scratch, partitions=partitions, report=report, findings=findings
        )
        wanted = None
        if manifest is not None:
            wanted = PartitionedSpill.by_hash(
                join(scratch, "manifest"), _MANIFEST_SCHEMA, key="id", partitions=partitions
            )
            _spill_manifest(manifest_fs, files, _RejectedRows(fs, root), wanted, report)
        for p in range(partitions):
            _join_partition(
                ids.read(p).column("id").combine_chunks(), None if wanted is None else wanted.read(p), findings
            )
        parts = {posixpath.basename(p).removesuffix(".parquet") for p in paths}
        _orphans(fs, root, report, parts=parts, tars=tars, images=images, clean=clean)
    findings.report_to(report)
    return report

"""`sdxl-batch verify`: check an output against the exactly-once contract.

Every metadata row must point to an image that exists and whose size and sha256 match (`--sample
FRACTION`: the sha256 of a random fraction, the size of all); no id may appear twice; every
metadata part must have the same schema (readers glob them) and be readable; with a manifest,
every manifest id must be present and no other. Objects that no committed part lists (images,
tars, stats records, temporary files of interrupted writes) are orphans of interrupted parts
(`output.orphans`): counted and reported, never counted as output; `clean` removes them.

Scale: the checks run where the data is, as planning does (`output.checks`: Ray tasks over
groups of parts on a cluster, or calls in this process for a small output), and the driver holds
O(parts): a path per part and the problems found (a count and the first few of each kind).
"""

from __future__ import annotations

import posixpath
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.io import filesystem, is_temporary_name, join
from pipeline.core.layout import JOB_RECORD, REJECTS_DIR, committed_parts, read_json
from pipeline.output.checks import (
    DUPLICATE,
    IMAGE_MISMATCH,
    IMAGE_MISSING,
    MANIFEST_MISSING,
    MAX_LISTED,
    NOT_IN_MANIFEST,
    ORDER,
    UNREADABLE_TAR,
    CheckHandles,
    Findings,
    ManifestHandles,
    PartsCheck,
    check_parts,
    join_ids,
    manifest_partitions,
    rejects_naming,
)
from pipeline.output.lease import OutputLease, describe_writer
from pipeline.output.manifest_ids import ManifestFile, manifest_files
from pipeline.output.orphans import Orphans, find_orphans, remove_orphans
from pipeline.output.streaming import ImageReferences
from pipeline.plan.executor import LocalExecutor, PlanExecutor
from pipeline.plan.manifest import manifest_reading

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pipeline.core.config import StorageConfig

__all__ = [
    "DAMAGED_PROBLEM", "DUPLICATE", "IMAGE_MISMATCH", "IMAGE_MISSING", "MANIFEST_MISSING", "NOT_IN_MANIFEST",
    "SCHEMA_PROBLEM", "UNREADABLE_TAR", "VerifyReport", "verify_output",
]  # fmt: skip

SCHEMA_PROBLEM = "metadata part with another schema than"
DAMAGED_PROBLEM = (
    "damaged committed part (cannot be read; `sdxl-batch run` moves it aside to damaged/ and renders its rows again)"
)
ROWS_PER_JOIN = 4_000_000  # ids joined by one task (some 500 MiB of Arrow and hash tables, on a worker)
MAX_PARTITIONS = 256
MIN_PARTS_PER_TASK = 16  # parts checked by one task, at least
# Ids in each table a task returns per partition, at least: Ray keeps a task's results under 100 KiB
# in the memory of the process that submitted it (the driver) and larger ones in the object store
# of the node that made them. Tables this large keep the ids off the driver (a 10M-row verify's
# driver grew by 370 MiB with tables of 5,000 ids).
MIN_IDS_PER_TABLE = 16_384
ExecutorFor = Callable[[int], PlanExecutor]  # the executor for an output of that many parts


@dataclass
class VerifyReport:
    rows: int = 0
    parts: int = 0
    checked_images: int = 0  # presence and size
    hashed_images: int = 0  # of which the sha256 too
    sample: float = 1.0
    seed: int | None = None  # what picked the sample (`--sample` below 1)
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

    def _images(self) -> str:
        if self.hashed_images == self.checked_images:
            return f"{self.checked_images} (sha256 and size)"
        return (
            f"{self.checked_images} (size; sha256 of {self.hashed_images}, a random {self.sample:.2%} sample, "
            f"seed {self.seed})"
        )

    def summary(self) -> str:
        lines = [f"note: {self.writer}"] if self.writer else []
        lines += [
            f"rows in metadata: {self.rows} in {self.parts} parts",
            f"images checked:   {self._images()}",
            f"orphans:          {self.orphans.describe()}: from interrupted parts, not counted"
            + ("; removed" if self.cleaned else "; `verify --clean` removes them" if self.orphans.count else ""),
        ]
        if self.manifest_rows is not None:
            lines.append(f"manifest rows:    {self.manifest_rows}")
            lines.append(f"rejected rows:    {self.rejected_rows} (listed in rejects/ with their reason; not rendered)")
        lines.append("OK: every row exactly once" if self.ok else "PROBLEMS:")
        lines.extend(f"  - {problem}" for problem in self.problems)
        if any(problem.startswith(MANIFEST_MISSING) for problem in self.problems):
            lines.append(
                "The missing ids are rows not rendered yet (a job stopped, or still to come): rerun the job and it "
                "renders those rows only (`sdxl-batch run` resumes; no row twice)."
            )
        return "\n".join(lines)


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


def verify_output(
    output: str,
    *,
    manifest: str | None = None,
    storage: StorageConfig | None = None,
    clean: bool = False,
    takeover: bool = False,
    sample: float = 1.0,
    executor: ExecutorFor | None = None,
) -> VerifyReport:
    """Check `output`; `clean`: also remove the objects of interrupted parts, holding the output's
    lease (a running job's uncommitted objects look the same: with a job writing, `clean` is
    refused). Without `clean` it reads without a lease, and says when a job is writing.
    `sample`: the fraction of images whose sha256 is checked (the size of all is); `executor`:
    picks where the checks run from the count of parts (default: in this process)."""
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample must be a fraction in (0, 1], got {sample}")
    fs, root = filesystem(output, storage)
    run = _Verify(fs, root, output, manifest=manifest, storage=storage, sample=sample, executor=executor)
    if not clean:
        report = run.verify(clean=False)
        report.writer = describe_writer(fs, root)
        return report
    with OutputLease(fs, root, command="verify --clean", takeover=takeover):
        return run.verify(clean=True)


@dataclass
class _Verify:
    fs: AbstractFileSystem
    root: str
    output: str
    manifest: str | None
    storage: StorageConfig | None
    sample: float
    executor: ExecutorFor | None

    def verify(self, *, clean: bool) -> VerifyReport:
        fs, root = self.fs, self.root
        fs.invalidate_cache()  # fresh listings: orphans are what no committed part lists (output.orphans)
        report = VerifyReport(sample=self.sample)
        paths = committed_parts(fs, root)
        if not paths:  # a job killed before its first commit may still have left objects
            report.problems.append(f"no metadata under {self.output} (nothing committed yet)")
            _orphans(fs, root, report, parts=set(), tars=set(), images=None, clean=clean)
            return report
        executor = self._executor(len(paths))
        # The manifest as the job that wrote the output read it (its job.json): format and images per row.
        manifest_format, per_row = manifest_reading(read_json(fs, join(root, JOB_RECORD)))
        _, files = (
            manifest_files(self.manifest, self.storage, manifest_format) if self.manifest is not None else (fs, [])
        )
        part_rows = _rows_per_part(fs, paths)
        wanted_rows = sum(f.rows for f in files) * per_row
        partitions = min(MAX_PARTITIONS, max(1, -(-max(part_rows * len(paths), wanted_rows) // ROWS_PER_JOIN)))
        if self.sample < 1.0:
            report.seed = random.SystemRandom().randrange(2**31)
        checks = self._check_parts(executor, paths, part_rows, report.seed or 0, partitions)
        wanted = self._manifest_ids(executor, files, partitions, per_row)
        report.manifest_rows = sum(f.rows for f in files) if self.manifest is not None else None
        joins = [
            executor.submit(
                join_ids,
                len(checks),
                self.manifest is not None,
                *(check.partitions[p] for check in checks),
                *(file.partitions[p] for file in wanted),
            )
            for p in range(partitions)
        ]
        findings = Findings()
        summaries: list[PartsCheck] = executor.get([check.summary for check in checks])
        readable = _summarise(summaries, report, findings)
        for found in executor.get(joins):
            findings.merge(found)
        report.rejected_rows = sum(executor.get([file.rejected for file in wanted]))
        with tempfile.TemporaryDirectory(prefix="sdxl-batch-verify-") as scratch:
            images = ImageReferences(join(scratch, "images"))
            for check in checks:  # one group's image paths at a time: O(rows) in all (files layout)
                images.add(executor.get([check.images])[0].column("path"))
            images.close()
            parts = {posixpath.basename(p).removesuffix(".parquet") for p in readable}
            tars = set().union(*(s.tars for s in summaries))
            _orphans(fs, root, report, parts=parts, tars=tars, images=images, clean=clean)
        _report_findings(findings, report)
        return report

    def _check_parts(
        self, executor: PlanExecutor, paths: list[str], part_rows: int, seed: int, partitions: int
    ) -> list[CheckHandles]:
        """Wave 1 (`output.checks`): a task per group of parts."""
        per_task = max(MIN_PARTS_PER_TASK, -(-MIN_IDS_PER_TABLE * partitions // max(1, part_rows)))
        groups = [paths[i : i + per_task] for i in range(0, len(paths), per_task)]
        args = (self.sample, seed, partitions)
        return [
            CheckHandles.of(
                executor.submit(check_parts, self.output, self.storage, group, *args, num_returns=2 + partitions)
            )
            for group in groups
        ]

    def _manifest_ids(
        self, executor: PlanExecutor, files: list[ManifestFile], partitions: int, images: int = 1
    ) -> list[ManifestHandles]:
        """Wave 2: a task per group of manifest files, with the rejects files that name each."""
        if self.manifest is None:
            return []
        rejects = rejects_naming(self.fs, _rejects_files(self.fs, self.root))
        groups: list[list[ManifestFile]] = [[]]
        for file in files:  # MIN_IDS_PER_TABLE ids per partition and group, at least
            if sum(f.rows for f in groups[-1]) * images >= MIN_IDS_PER_TABLE * partitions:
                groups.append([])
            groups[-1].append(file)
        return [
            ManifestHandles.of(
                executor.submit(
                    manifest_partitions,
                    group,
                    self.storage,
                    [rejects.get(f.uri, []) for f in group],
                    self.output,
                    partitions,
                    images,
                    num_returns=1 + partitions,
                )
            )
            for group in groups
            if group
        ]

    def _executor(self, parts: int) -> PlanExecutor:
        return LocalExecutor() if self.executor is None else self.executor(parts)


def _summarise(summaries: list[PartsCheck], report: VerifyReport, findings: Findings) -> list[str]:
    """The groups' records added up: rows, images, damaged parts and schemas (every part against
    the first readable one's: globbing readers such as DuckDB, Polars, pyarrow and Hugging Face
    drop columns or fail on parts that differ). Returns the readable parts."""
    readable: list[str] = []
    damaged: list[str] = []
    first: tuple[object, str] | None = None
    differ: list[str] = []
    for check in summaries:
        report.rows += check.rows
        report.checked_images += check.sized
        report.hashed_images += check.hashed
        readable += check.readable
        damaged += check.damaged
        findings.merge(check.findings)
        for schema, names in check.schemas:
            if first is None:
                first = (schema, names[0])
            if not schema.equals(first[0]):
                differ += names
    report.parts = len(readable)
    report.add(DAMAGED_PROBLEM, damaged)
    if first is not None:
        report.add(f"{SCHEMA_PROBLEM} {first[1]}", differ)
    return readable


def _report_findings(findings: Findings, report: VerifyReport) -> None:
    for kind in sorted(findings.counts, key=lambda k: ORDER.index(k) if k in ORDER else -1):
        report.add_counted(kind, findings.counts[kind], findings.shown[kind])


def _rows_per_part(fs: AbstractFileSystem, paths: list[str]) -> int:
    """The rows of the first readable part (from its footer): parts hold about the same, which is
    enough to size the tasks and the joins' partitions."""
    import pyarrow.parquet as pq

    from pipeline.plan.parts import DAMAGE_ERRORS

    for path in paths[:8]:
        try:
            with fs.open(path, "rb") as handle:
                return int(pq.read_metadata(handle).num_rows)
        except DAMAGE_ERRORS:
            continue
    return 0


def _rejects_files(fs: AbstractFileSystem, root: str) -> list[str]:
    folder = join(root, REJECTS_DIR)
    return [p for p in (fs.find(folder) if fs.exists(folder) else []) if _is_rejects_file(p)]


def _is_rejects_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith((".", "_")) and not is_temporary_name(name)

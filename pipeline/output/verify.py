"""`sdxl-batch verify`: check an output against the exactly-once contract.

Every metadata row must point to an image that exists and whose sha256 and size match; no id
may appear twice; every metadata part must have the same schema (readers glob them); with a
manifest, every manifest id must be present and no other. Objects that no committed part lists
(images, tars, stats records, temporary files of interrupted writes) are orphans of interrupted
parts (`output.orphans`): counted and reported, never counted as output; `clean` removes them.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.core.io import filesystem, join
from pipeline.core.layout import REJECTS_DIR, committed_parts
from pipeline.output.orphans import Orphans, find_orphans, remove_orphans
from pipeline.plan.manifest import ManifestPlan, plan_manifest

if TYPE_CHECKING:
    from pipeline.core.config import StorageConfig

MAX_LISTED = 10


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, items: list[str]) -> None:
        if items:
            shown = ", ".join(items[:MAX_LISTED]) + (
                f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            )
            self.problems.append(f"{kind} ({len(items)}): {shown}")

    def summary(self) -> str:
        lines = [
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


def _fingerprint(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def _read_fingerprint(fs: Any, path: str) -> tuple[str, int] | None:
    try:
        return _fingerprint(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _check_files(fs: Any, root: str, rows: list[dict[str, Any]], report: VerifyReport) -> set[str]:
    paths = [join(root, row["image_path"]) for row in rows]
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer faster in parallel
        found = list(pool.map(lambda p: _read_fingerprint(fs, p), paths))
    missing = [row["id"] for row, got in zip(rows, found, strict=True) if got is None]
    wrong = [
        row["id"]
        for row, got in zip(rows, found, strict=True)
        if got is not None and got != (row["sha256"], row["bytes"])
    ]
    report.add("image missing", missing)
    report.add("image sha256 or size mismatch", wrong)
    report.checked_images += len(rows)
    return {row["image_path"] for row in rows}


def _check_tars(fs: Any, root: str, rows: list[dict[str, Any]], report: VerifyReport) -> None:
    by_tar: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_tar[row["image_path"]].append(row)
    missing: list[str] = []
    wrong: list[str] = []
    for tar_path, members in by_tar.items():
        try:
            data = fs.cat_file(join(root, tar_path))
        except FileNotFoundError:
            missing.extend(r["id"] for r in members)
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = set(tar.getnames())
                for row in members:
                    handle = tar.extractfile(row["tar_member"]) if row["tar_member"] in names else None
                    if handle is None:
                        missing.append(row["id"])
                    elif _fingerprint(handle.read()) != (row["sha256"], row["bytes"]):
                        wrong.append(row["id"])
        except tarfile.TarError:
            report.add("unreadable tar shard", [tar_path])
            wrong.extend(r["id"] for r in members)
    report.add("image missing", missing)
    report.add("image sha256 or size mismatch", wrong)
    report.checked_images += len(rows)


def _rejected_mask(fs: Any, root: str, plan: ManifestPlan) -> np.ndarray:
    """Manifest rows that rejects/ lists (matched by file and row): skipped, so not missing."""
    mask = np.zeros(plan.total_rows, dtype=bool)
    folder = join(root, REJECTS_DIR)
    if not fs.exists(folder):
        return mask
    rejects = pads.dataset(folder, format="parquet", filesystem=fs).to_table(columns=["file", "row"])
    starts = dict(zip(plan.files, np.cumsum([0, *plan.file_rows[:-1]]).tolist(), strict=True))
    for file, row in zip(rejects.column("file").to_pylist(), rejects.column("row").to_pylist(), strict=True):
        if file in starts and row is not None and 0 <= row < plan.total_rows - starts[file]:
            mask[starts[file] + row] = True
    return mask


def _check_schemas(fs: Any, paths: list[str], report: VerifyReport) -> None:
    """Every part must have the first part's schema: globbing readers (DuckDB, Polars, pyarrow,
    Hugging Face) drop columns or fail on parts that differ."""

    def schema(path: str) -> pa.Schema:
        with fs.open(path, "rb") as handle:
            return pq.read_schema(handle)

    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(schema, paths))
    first = schemas[0].remove_metadata()
    report.add(
        f"metadata part with another schema than {posixpath.basename(paths[0])}",
        [posixpath.basename(p) for p, s in zip(paths, schemas, strict=True) if not s.remove_metadata().equals(first)],
    )


def _orphans(fs: Any, root: str, report: VerifyReport, *, referenced: set[str], parts: set[str], clean: bool) -> None:
    report.orphans = find_orphans(fs, root, referenced=referenced, parts=parts)
    if clean and report.orphans.count:
        remove_orphans(fs, root, report.orphans)
        report.cleaned = True


def verify_output(
    output: str, *, manifest: str | None = None, storage: StorageConfig | None = None, clean: bool = False
) -> VerifyReport:
    """Check `output`; `clean`: also remove the objects of interrupted parts (only while no job
    writes into the output: a running job's uncommitted objects look the same)."""
    fs, root = filesystem(output, storage)
    fs.invalidate_cache()  # fresh listings: orphans are what no committed part lists (output.orphans)
    report = VerifyReport()
    paths = committed_parts(fs, root)
    if not paths:  # a job killed before its first commit may still have left objects
        report.problems.append(f"no metadata under {output} (nothing committed yet)")
        _orphans(fs, root, report, referenced=set(), parts=set(), clean=clean)
        return report
    _check_schemas(fs, paths, report)
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    table = dataset.to_table(columns=["id", "image_path", "tar_member", "sha256", "bytes"])
    report.rows, report.parts = table.num_rows, len(dataset.files)
    counts = pc.value_counts(table.column("id"))
    report.add("duplicate id", pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist())
    rows = table.to_pylist()
    tar_rows = [r for r in rows if r["tar_member"]]
    referenced = _check_files(fs, root, [r for r in rows if not r["tar_member"]], report)
    referenced |= {r["image_path"] for r in tar_rows}
    _check_tars(fs, root, tar_rows, report)
    parts = {posixpath.basename(p).removesuffix(".parquet") for p in paths}
    _orphans(fs, root, report, referenced=referenced, parts=parts, clean=clean)
    if manifest is not None:
        plan = plan_manifest(manifest, storage)
        report.manifest_rows = plan.total_rows
        rejected = _rejected_mask(fs, root, plan)
        report.rejected_rows = int(rejected.sum())
        present = pc.unique(table.column("id"))
        missing = pc.and_(pc.invert(pc.is_in(plan.ids, present)), pa.array(~rejected))
        report.add("manifest id missing from the output", pc.filter(plan.ids, missing).to_pylist())
        report.add(
            "output id not in the manifest", pc.filter(present, pc.invert(pc.is_in(present, plan.ids))).to_pylist()
        )
    return report

"""Writing committed parts: images first, then the metadata part that marks them done.

Unit of commit: one *part* of up to `write.rows_per_part` rows. Its images (or its tar shard in
the webdataset layout) are written first and `metadata/part-<digest>.parquet` last, atomically.
A row is done exactly when a metadata part lists it; an image without a metadata row is an
orphan of an interrupted part and is simply overwritten when the row is rendered again.

The part name is a digest of its sorted ids, so a retried part (Ray re-running a task after a
worker died) writes the same objects under the same names instead of a duplicate.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import StorageError
from pipeline.core.io import filesystem, is_remote_fs, join, write_bytes
from pipeline.core.layout import (
    EXTENSIONS,
    image_relpath,
    metadata_path,
    part_name,
    part_stats_path,
    safe_name,
    shard_relpath,
)
from pipeline.output.stats import PartStats, merge_telemetry

# Leading metadata columns, in order; pass-through manifest columns follow.
METADATA_COLUMNS = (
    "id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale",
    "model", "scheduler", "weights", "image_path", "tar_member", "sha256", "bytes",
    "prompt_tokens", "prompt_truncated", "negative_prompt_truncated", "render_batch_size",
    "generation_seconds", "encode_seconds", "peak_memory_mb", "node", "actor",
)  # fmt: skip
TELEMETRY = "telemetry"  # the generator's batch records (PartStats JSON): merged into the part's stats


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata records about the model for every row."""

    model: str
    scheduler: str
    weights: str = ""


class PartWriter:
    """Writes one part of encoded rows under an output prefix (local or object store)."""

    def __init__(self, *, output: str, layout: str, image_format: str, model: ModelInfo, storage: Any = None):
        self.fs, self.root = filesystem(output, storage)
        self.layout = layout
        self.ext = EXTENSIONS[image_format]
        self.model = model

    def write(self, batch: pa.Table) -> PartStats:
        """Commit one part. Transient object-store errors are retried by botocore; an error that
        outlasts the retries stops the job with a StorageError, and the parts already committed
        stay valid, so the same command resumes once the output is writable again."""
        try:
            return self._write(batch)
        except (OSError, ValueError) as error:  # s3fs maps S3 errors (AccessDenied, NoSuchBucket) to OSErrors
            raise StorageError(
                f"cannot write to the output {self.fs.unstrip_protocol(self.root)}: {type(error).__name__}: {error}. "
                "Parts committed so far are kept; rerun the same command to resume once the output is writable."
            ) from None

    def _write(self, batch: pa.Table) -> PartStats:
        start = time.perf_counter()
        ids: list[str] = batch.column("id").to_pylist()
        name = part_name(ids)
        images: list[bytes] = batch.column("image").to_pylist()
        telemetry = merge_telemetry(batch.column(TELEMETRY).to_pylist() if TELEMETRY in batch.column_names else [])
        dropped = ["image", *([TELEMETRY] if TELEMETRY in batch.column_names else [])]
        table = self._metadata(batch.drop_columns(dropped), ids, name)
        if self.layout == "webdataset":
            self._write_tar(name, table, images)
        else:
            self._write_files(table.column("image_path").to_pylist(), images)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        record = self._summary(name, table)
        record += telemetry
        record.committed_at = time.time()
        # The upload: images (above) and the two small files below.
        record.upload_seconds = time.perf_counter() - start
        # The part's stats record, next to its outputs and before the metadata that commits it.
        write_bytes(self.fs, part_stats_path(self.root, name), record.to_json().encode())
        write_bytes(self.fs, metadata_path(self.root, name), buffer.getvalue())
        return record

    def _metadata(self, batch: pa.Table, ids: list[str], name: str) -> pa.Table:
        n = batch.num_rows
        batch = batch.append_column("model", pa.array([self.model.model] * n, pa.string()))
        batch = batch.append_column("scheduler", pa.array([self.model.scheduler] * n, pa.string()))
        batch = batch.append_column("weights", pa.array([self.model.weights] * n, pa.string()))
        if self.layout == "webdataset":
            paths = [shard_relpath(name)] * n
            members: list[str | None] = [f"{safe_name(i)}.{self.ext}" for i in ids]
        else:
            paths = [image_relpath(i, self.ext) for i in ids]
            members = [None] * n
        batch = batch.append_column("image_path", pa.array(paths, pa.string()))
        batch = batch.append_column("tar_member", pa.array(members, pa.string()))
        leading = [c for c in METADATA_COLUMNS if c in batch.column_names]
        return batch.select(leading + [c for c in batch.column_names if c not in leading])

    def _write_files(self, relpaths: list[str], images: list[bytes]) -> None:
        targets = {join(self.root, rel): data for rel, data in zip(relpaths, images, strict=True)}
        if is_remote_fs(self.fs):
            self.fs.pipe(targets)  # s3fs uploads these concurrently
            return
        for path, data in targets.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)

    def _write_tar(self, name: str, table: pa.Table, images: list[bytes]) -> None:
        buffer = io.BytesIO()
        rows = table.to_pylist()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for row, data in zip(rows, images, strict=True):
                stem = safe_name(row["id"])
                sidecar = json.dumps(row, default=str, ensure_ascii=False).encode()
                for member, payload in ((f"{stem}.{self.ext}", data), (f"{stem}.json", sidecar)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        write_bytes(self.fs, join(self.root, shard_relpath(name)), buffer.getvalue())

    @staticmethod
    def _summary(name: str, table: pa.Table) -> PartStats:
        """The part's figures that its metadata holds, row by row."""

        def total(column: str) -> float:
            return float(sum(table.column(column).to_pylist()))

        def count(flag: str) -> int:  # a flag column of older inputs may be missing
            return int(total(flag)) if flag in table.column_names else 0

        sizes = table.column("render_batch_size").to_pylist() if "render_batch_size" in table.column_names else []
        return PartStats(
            part=name,
            rows=table.num_rows,
            bytes=int(total("bytes")),
            generation_seconds=total("generation_seconds"),
            encode_seconds=total("encode_seconds"),
            peak_memory_mb=float(max(table.column("peak_memory_mb").to_pylist(), default=0.0)),
            prompts_truncated=count("prompt_truncated"),
            negative_prompts_truncated=count("negative_prompt_truncated"),
            min_render_batch_size=int(min(sizes, default=0)),
            actors=Counter(table.column("actor").to_pylist()),
            nodes=Counter(table.column("node").to_pylist()),
        )

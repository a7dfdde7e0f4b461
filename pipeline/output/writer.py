"""Writing committed parts: images first, then the metadata part that marks them done.

Unit of commit: one *part* of up to `write.rows_per_part` rows. Its images (or its tar shard in
the webdataset layout) are written first and `metadata/part-<digest>.parquet` last, atomically.
A row is done exactly when a metadata part lists it. An image or tar that no metadata part lists
is an orphan of an interrupted part: an image is overwritten when its row is rendered again, but
a tar is named after its rows, so a resumed job that groups them differently leaves it behind;
`sdxl-batch verify` counts orphans and `verify --clean` removes them.

Every part has the job's one metadata schema (`layout.metadata_schema`: the fixed columns, then
the manifest's pass-through columns as planned), so readers can glob the parts. In the webdataset
layout each row is three tar members sharing its key (`layout.sample_key`, never a dot):
`<key>.<ext>` (the image), `<key>.json` (its metadata row) and `<key>.txt` (the prompt, the
caption img2dataset-style loaders expect; `write.captions`).

The part name is a digest of its sorted ids, so a retried part (Ray re-running a task after a
worker died) writes the same objects under the same names instead of a duplicate.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import StorageError
from pipeline.core.io import STORAGE_ERRORS, filesystem, join, write_bytes, write_files
from pipeline.core.layout import (
    EXTENSIONS,
    METADATA_FIELDS,
    image_relpath,
    metadata_path,
    metadata_schema,
    part_name,
    part_stats_path,
    sample_key,
    shard_relpath,
)
from pipeline.output.stats import PartStats, merge_telemetry
from pipeline.plan.schema import conform

TELEMETRY = "telemetry"  # the generator's batch records (PartStats JSON): merged into the part's stats


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata records about the model for every row."""

    model: str
    scheduler: str
    weights: str = ""


class PartWriter:
    """Writes one part of encoded rows under an output prefix (local or object store)."""

    def __init__(
        self,
        *,
        output: str,
        layout: str,
        image_format: str,
        model: ModelInfo,
        storage: Any = None,
        schema: pa.Schema | None = None,
        captions: bool = True,
    ):
        """`schema`: the job's metadata schema (`layout.metadata_schema` of the planned pass-through
        columns); None takes the pass-through columns as each batch has them (tests, tools).
        `captions`: write `<key>.txt` with the prompt into tars."""
        self.fs, self.root = filesystem(output, storage)
        self.layout = layout
        self.ext = EXTENSIONS[image_format]
        self.model = model
        self.schema = schema
        self.captions = captions

    def write(self, batch: pa.Table) -> PartStats:
        """Commit one part. Transient object-store errors are retried by botocore; an error that
        outlasts the retries stops the job with a StorageError, and the parts already committed
        stay valid, so the same command resumes once the output is writable again."""
        try:
            return self._write(batch)
        except STORAGE_ERRORS as error:  # s3fs maps S3's answers (AccessDenied, NoSuchBucket) to OSErrors
            raise StorageError(
                f"cannot write to the output {self.fs.unstrip_protocol(self.root)}: {type(error).__name__}: {error}. "
                "Parts committed so far are kept; rerun the same command to resume once the output is writable."
            ) from error

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
        keys = [sample_key(i) for i in ids]
        batch = batch.append_column("key", pa.array(keys, pa.string()))
        if self.layout == "webdataset":
            paths = [shard_relpath(name)] * n
            members: list[str | None] = [f"{key}.{self.ext}" for key in keys]
        else:
            paths = [image_relpath(i, self.ext) for i in ids]
            members = [None] * n
        batch = batch.append_column("image_path", pa.array(paths, pa.string()))
        batch = batch.append_column("tar_member", pa.array(members, pa.string()))
        schema = self.schema
        if schema is None:
            schema = metadata_schema(pa.schema([f for f in batch.schema if f.name not in METADATA_FIELDS.names]))
        return conform(batch, schema)

    def _write_files(self, relpaths: list[str], images: list[bytes]) -> None:
        """Each image through a temporary file and a rename (a row re-rendered after a kill never
        leaves a truncated image that a committed part lists), fsynced before the part commits."""
        write_files(self.fs, {join(self.root, rel): data for rel, data in zip(relpaths, images, strict=True)})

    def _write_tar(self, name: str, table: pa.Table, images: list[bytes]) -> None:
        buffer = io.BytesIO()
        rows = table.to_pylist()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for row, data in zip(rows, images, strict=True):
                key = row["key"]
                members = [(f"{key}.{self.ext}", data), (f"{key}.json", _json_bytes(row))]
                if self.captions:
                    members.append((f"{key}.txt", row["prompt"].encode()))
                for member, payload in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        write_bytes(self.fs, join(self.root, shard_relpath(name)), buffer.getvalue())

    @staticmethod
    def _summary(name: str, table: pa.Table) -> PartStats:
        """The part's figures that its metadata holds, row by row."""

        def total(column: str) -> float:  # a column a batch lacked is all nulls (tools, older inputs)
            return float(pc.sum(table.column(column)).as_py() or 0)

        def count(flag: str) -> int:
            return int(pc.sum(pc.cast(table.column(flag), pa.int64())).as_py() or 0)

        sizes = pc.min(table.column("render_batch_size")).as_py()
        return PartStats(
            part=name,
            rows=table.num_rows,
            bytes=int(total("bytes")),
            generation_seconds=total("generation_seconds"),
            encode_seconds=total("encode_seconds"),
            peak_memory_mb=float(pc.max(table.column("peak_memory_mb")).as_py() or 0.0),
            prompts_truncated=count("prompt_truncated"),
            negative_prompts_truncated=count("negative_prompt_truncated"),
            min_render_batch_size=int(sizes or 0),
            actors=Counter(table.column("actor").to_pylist()),
            nodes=Counter(table.column("node").to_pylist()),
        )


def _json_bytes(row: dict[str, Any]) -> bytes:
    """A metadata row as the `.json` member: every column, nulls included, so a reader that types
    the json from the first samples sees each field with its value or null, never missing."""
    return json.dumps(row, default=str, ensure_ascii=False).encode()

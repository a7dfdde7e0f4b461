"""What a finished job leaves for the libraries that read its output.

The parts are the output; at the end of every job (a resumed or incremental one too) this module
adds, from the committed parts alone:

- `shards.txt` (webdataset layout): the committed tars, one relative path per line, in name
  order. Tar names are digests, which brace patterns cannot express, and a glob of `shards/*.tar`
  would also match a tar of an interrupted part.
- `metadata.parquet` (files layout): every metadata row with a leading `file_name` column (the
  image's path), the index Hugging Face's `imagefolder` looks for at or above the images; with it,
  imagefolder adds the metadata and invents no class labels from the shard folders.
- `README.md`: a Hugging Face dataset card whose `configs` name the data files and whose
  `dataset_info.features` come from the job's metadata schema, so `datasets.load_dataset(OUTPUT)`
  loads images with their metadata in either layout, without guessing types from the first
  samples (huggingface/datasets#7549). It lists the tars one by one up to MAX_LISTED_SHARDS and
  names them `shards/*.tar` above: the orphans are removed just before, so the glob matches the
  committed tars when the card is written, and `datasets` resolves one pattern, not millions.

It also removes the objects of interrupted parts (`output.orphans`): at the end of a job every
row the job rendered is committed, so any object no part lists is left from an earlier run.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline.core.io import join, open_atomic, write_bytes
from pipeline.core.layout import (
    DATASET_CARD,
    EXTENSIONS,
    IMAGEFOLDER_INDEX,
    IMAGES_DIR,
    SHARD_LIST,
    SHARDS_DIR,
    committed_parts,
)
from pipeline.output.orphans import Orphans, find_orphans, remove_orphans
from pipeline.output.streaming import ImageReferences, bounded_map, read_columns

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

# Arrow type names that Hugging Face's `Value` spells otherwise.
_HF_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64", "date32[day]": "date32"}
_HF_NAMES["date64[ms]"] = "date64"
# Hugging Face's webdataset loader decodes these members by extension.
_JSON_NATIVE = (pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_string)


@dataclass
class Published:
    rows: int
    shards: int
    orphans: Orphans


def publish(fs: AbstractFileSystem, root: str, *, layout: str, image_format: str, captions: bool) -> Published | None:
    """Write the shard list or the imagefolder index, and the dataset card, for the committed
    parts under `root`; remove orphans first. None when nothing is committed.

    Memory is O(parts), not O(rows): the parts are streamed, the files layout's image paths
    spilled to local temporary files by image folder (`output.streaming`), and the tars (one per
    part) held as a set."""
    # s3fs caches listings per process: the planner listed metadata/ before the job committed its
    # parts, and a stale listing would take every new tar for an orphan (and remove it).
    fs.invalidate_cache()
    paths = committed_parts(fs, root)
    if not paths:
        return None
    with fs.open(paths[0], "rb") as handle:
        schema = pq.read_schema(handle).remove_metadata()
    parts = {posixpath.basename(p).removesuffix(".parquet") for p in paths}
    with tempfile.TemporaryDirectory(prefix="sdxl-batch-publish-") as scratch:
        images = ImageReferences(scratch)
        if layout == "webdataset":
            rows, tars = _tar_paths(fs, paths)
        else:
            rows, tars = _write_index(fs, root, paths, schema, images), set()
        images.close()
        orphans = find_orphans(fs, root, parts=parts, tars=tars, images=images)
    if orphans.count:
        logger.info("removing the objects of interrupted parts: %s", orphans.describe())
        remove_orphans(fs, root, orphans)
    shards = sorted(tars)
    if layout == "webdataset":
        _write_shard_list(fs, root, shards)
    card = dataset_card(schema, layout=layout, image_format=image_format, captions=captions, shards=shards)
    write_bytes(fs, join(root, DATASET_CARD), card.encode())
    return Published(rows=rows, shards=len(shards), orphans=orphans)


def _tar_paths(fs: AbstractFileSystem, paths: list[str]) -> tuple[int, set[str]]:
    """The rows, and the tars they are in (one per part: O(parts))."""
    rows, tars = 0, set()
    for table in bounded_map(lambda path: read_columns(fs, path, ["image_path"]), paths):
        rows += table.num_rows
        tars.update(pc.unique(table.column("image_path")).to_pylist())
    return rows, tars


# Rows per row group of the imagefolder index: one row group per part would put O(parts) row
# group records in its footer (held by the writer until it closes, then by every reader).
INDEX_ROW_GROUP_ROWS = 1 << 17


def _write_index(
    fs: AbstractFileSystem, root: str, paths: list[str], schema: pa.Schema, images: ImageReferences
) -> int:
    """Stream every part (in order, read in parallel) into `metadata.parquet` with `file_name`
    first, in the first part's schema; returns the rows, the image paths going to `images`."""
    index_schema = pa.schema([pa.field("file_name", pa.string()), *schema])
    rows, pending, buffered = 0, [], 0
    with open_atomic(fs, join(root, IMAGEFOLDER_INDEX)) as handle, pq.ParquetWriter(handle, index_schema) as writer:
        for table in bounded_map(lambda path: _conformed(fs, path, schema), paths):
            images.add(table.column("image_path"))
            pending.append(table.add_column(0, "file_name", table.column("image_path")))
            buffered += table.num_rows
            if buffered >= INDEX_ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=buffered)
                rows, pending, buffered = rows + buffered, [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=buffered)
    return rows + buffered


def _conformed(fs: AbstractFileSystem, path: str, schema: pa.Schema) -> pa.Table:
    """A part in `schema`, as a dataset scan would read it: columns it lacks are nulls."""
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.table(columns, schema=schema)


def _write_shard_list(fs: AbstractFileSystem, root: str, shards: list[str]) -> None:
    with open_atomic(fs, join(root, SHARD_LIST)) as handle:
        for start in range(0, len(shards), 10_000):
            handle.write("".join(f"{s}\n" for s in shards[start : start + 10_000]).encode())


# Above this many tars the card names them by a glob: `datasets` resolves each listed file on its
# own (a HEAD request per file on an object store; some 2.4 s per 20,000 on local disk) and parses
# the card's YAML (0.5 s per 20,000), so an explicit list of 1.5 million tars would take hours.
MAX_LISTED_SHARDS = 10_000


def dataset_card(schema: pa.Schema, *, layout: str, image_format: str, captions: bool, shards: list[str]) -> str:
    """The dataset card: YAML front matter for `datasets.load_dataset`, then a short description."""
    ext = EXTENSIONS[image_format]
    if layout == "webdataset":
        files: list[str] = shards if len(shards) <= MAX_LISTED_SHARDS else [f"{SHARDS_DIR}/*.tar"]
        features = [
            {"name": "__key__", "dtype": "string"},
            {"name": "__url__", "dtype": "string"},
            {"name": ext, "dtype": "image"},
            {"name": "json", "struct": [{"name": f.name, **_hf_type(f.type, json=True)} for f in schema]},
        ]
        if captions:
            features.append({"name": "txt", "dtype": "string"})
        config: dict[str, Any] = {"config_name": "default", "data_files": [{"split": "train", "path": files}]}
    else:
        files = [IMAGEFOLDER_INDEX, f"{IMAGES_DIR}/*/*.{ext}"]
        features = [{"name": "image", "dtype": "image"}, *({"name": f.name, **_hf_type(f.type)} for f in schema)]
        config = {"config_name": "default", "drop_labels": True, "data_files": [{"split": "train", "path": files}]}
    front = yaml.safe_dump(
        {"configs": [config], "dataset_info": {"config_name": "default", "features": features}},
        sort_keys=False,
        allow_unicode=True,
    )
    return f"---\n{front}---\n\n{_DESCRIPTION[layout]}"


def _hf_type(type_: pa.DataType, *, json: bool = False) -> dict[str, Any]:
    """A Hugging Face feature for an Arrow type, as the card's YAML writes it. `json`: the type a
    value has after a round trip through the `.json` member (`default=str` for the rest)."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        inner = _hf_type(type_.value_type, json=json)
        key = "list" if json or pa.types.is_list(type_) else "large_list"
        return {key: inner.get("dtype", inner.get("struct", inner))}
    if pa.types.is_struct(type_):
        return {"struct": [{"name": f.name, **_hf_type(f.type, json=json)} for f in type_]}
    if json and pa.types.is_null(type_):
        return {"dtype": "null"}
    if json and not any(check(type_) for check in _JSON_NATIVE):
        return {"dtype": "string"}
    if json and pa.types.is_large_string(type_):
        return {"dtype": "string"}
    return {"dtype": _HF_NAMES.get(str(type_), str(type_))}


_USAGE = """\
Read it with `datasets.load_dataset("<this folder>")`, or as the sdxl-batch documentation's
"Reading the output" shows (webdataset, DuckDB, Polars, pandas, pyarrow). The metadata parts
under `metadata/` are the record of what is done; this card is rewritten at the end of every job.
"""
_DESCRIPTION = {
    "webdataset": "# Images rendered by sdxl-batch (webdataset layout)\n\nEach tar in `shards/` holds, per row, "
    "`<key>.<ext>` (the image), `<key>.json` (its metadata row) and `<key>.txt` (the prompt, unless "
    "`write.captions` is off). `shards.txt` lists the committed tars in order.\n\n" + _USAGE,
    "files": "# Images rendered by sdxl-batch (files layout)\n\nOne image per row under `images/`; "
    "`metadata.parquet` is every metadata row with its image's `file_name`.\n\n" + _USAGE,
}

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
  samples (huggingface/datasets#7549).

It also removes the objects of interrupted parts (`output.orphans`): at the end of a job every
row the job rendered is committed, so any object no part lists is left from an earlier run.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from pipeline.core.io import join, open_atomic, write_bytes
from pipeline.core.layout import DATASET_CARD, EXTENSIONS, IMAGEFOLDER_INDEX, IMAGES_DIR, SHARD_LIST, committed_parts
from pipeline.output.orphans import Orphans, find_orphans, remove_orphans

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
    parts under `root`; remove orphans first. None when nothing is committed."""
    # s3fs caches listings per process: the planner listed metadata/ before the job committed its
    # parts, and a stale listing would take every new tar for an orphan (and remove it).
    fs.invalidate_cache()
    paths = committed_parts(fs, root)
    if not paths:
        return None
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    referenced = _tar_paths(dataset) if layout == "webdataset" else _write_index(fs, root, dataset)
    parts = {posixpath.basename(p).removesuffix(".parquet") for p in paths}
    orphans = find_orphans(fs, root, referenced=referenced, parts=parts)
    if orphans.count:
        logger.info("removing the objects of interrupted parts: %s", orphans.describe())
        remove_orphans(fs, root, orphans)
    shards = sorted(referenced) if layout == "webdataset" else []
    if layout == "webdataset":
        write_bytes(fs, join(root, SHARD_LIST), "".join(f"{s}\n" for s in shards).encode())
    card = dataset_card(dataset.schema, layout=layout, image_format=image_format, captions=captions, shards=shards)
    write_bytes(fs, join(root, DATASET_CARD), card.encode())
    return Published(rows=dataset.count_rows(), shards=len(shards), orphans=orphans)


def _tar_paths(dataset: pads.Dataset) -> set[str]:
    tars: set[str] = set()
    for batch in dataset.to_batches(columns=["image_path"]):
        tars.update(pc.unique(batch.column("image_path")).to_pylist())
    return tars


def _write_index(fs: AbstractFileSystem, root: str, dataset: pads.Dataset) -> set[str]:
    """Stream every part into `metadata.parquet` with `file_name` first; returns the images."""
    schema = pa.schema([pa.field("file_name", pa.string()), *dataset.schema])
    images: set[str] = set()
    with open_atomic(fs, join(root, IMAGEFOLDER_INDEX)) as handle, pq.ParquetWriter(handle, schema) as writer:
        for batch in dataset.to_batches():
            paths = batch.column("image_path")
            images.update(paths.to_pylist())
            writer.write_batch(pa.RecordBatch.from_arrays([paths, *batch.columns], schema=schema))
    return images


def dataset_card(schema: pa.Schema, *, layout: str, image_format: str, captions: bool, shards: list[str]) -> str:
    """The dataset card: YAML front matter for `datasets.load_dataset`, then a short description."""
    ext = EXTENSIONS[image_format]
    if layout == "webdataset":
        files: list[str] = shards
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

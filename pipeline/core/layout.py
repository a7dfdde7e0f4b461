"""Every name under a job's output prefix, the object names of rows, and the JSON records there.

    OUTPUT/
      job.json                          the job's record (config, manifest files, fingerprint)
      lease.json                        the running writer's lease (`output.lease`); absent between jobs
      metadata/part-<digest>.parquet    one per committed part, written last: the ledger of done rows
      stats/part-<digest>.json          the part's measurements, written just before its metadata part
      images/<shard>/<key>.<ext>        the files layout: one object per image
      shards/part-<digest>.tar          the webdataset layout: one tar per part, <key>.<ext|json|txt> members
      rejects/<manifest file>.parquet   bad rows (`on_bad_row: skip`)
      damaged/part-<digest>.parquet     committed parts that could not be read, moved aside (their rows rendered again)
      stats/runs/<finished>-<id>.json   each run that rendered: its stats.json record, kept
      stats.json                        the last rendering run's statistics and the whole output's (all runs)
      report.html                       `sdxl-batch report`
      README.md                         a Hugging Face dataset card: `datasets.load_dataset(OUTPUT)` reads it
      metadata.parquet                  the files layout's `file_name` index for Hugging Face's imagefolder
      shards.txt                        the committed tars, one per line, in name order (webdataset)
      grids/, compare.md                `sdxl-batch compare`

Row keys: ids come from other teams' scripts: they may hold `/`, `..`, dots, URL-encoded or
look-alike separators, control characters or thousands of characters. An id that is already a short
run of `[A-Za-z0-9_-]` is its own key, so common ids stay readable; any other id keeps a readable,
sanitised prefix plus a hash of the original id, so two different ids can never map to the same
key. A readable id shaped like such a key (ending in `-` and 16 hex digits) is hashed too, since it
could otherwise take the key of another id (`a/b` and `a_b-<its hash>`). Keys have no dots because
webdataset readers split a tar member's name at the first dot of its basename (`<key>.<field>`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.core.errors import StorageError
from pipeline.core.io import full_uri, join, read_bytes, write_bytes

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

JOB_RECORD = "job.json"
STATS_FILE = "stats.json"
REPORT_FILE = "report.html"
METADATA_DIR = "metadata"
STATS_DIR = "stats"
IMAGES_DIR = "images"
SHARDS_DIR = "shards"
REJECTS_DIR = "rejects"
DAMAGED_DIR = "damaged"
GRIDS_DIR = "grids"
COMPARE_FILE = "compare.md"
DATASET_CARD = "README.md"
IMAGEFOLDER_INDEX = "metadata.parquet"
SHARD_LIST = "shards.txt"
RUNS_DIR = f"{STATS_DIR}/runs"  # one record per run that rendered (`output.runs`)
LEASE_FILE = "lease.json"  # not in OUTPUT_ENTRIES: `--overwrite` keeps the lease it holds
# Everything a job or `compare` writes: what `--overwrite` clears, and nothing else.
OUTPUT_ENTRIES = (
    METADATA_DIR, STATS_DIR, IMAGES_DIR, SHARDS_DIR, REJECTS_DIR, GRIDS_DIR, STATS_FILE, JOB_RECORD, COMPARE_FILE,
    DATASET_CARD, IMAGEFOLDER_INDEX, SHARD_LIST, DAMAGED_DIR,
)  # fmt: skip
# File extension of each image format.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# The columns every metadata part starts with, in order; the manifest's other columns follow, with
# the types the job planned for them (`metadata_schema`; plan.schema explains why one schema).
METADATA_FIELDS = pa.schema([
    ("id", pa.string()), ("key", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("seed", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("steps", pa.int32()),
    ("guidance_scale", pa.float64()), ("model", pa.string()), ("scheduler", pa.string()),
    ("weights", pa.string()), ("image_path", pa.string()), ("tar_member", pa.string()), ("sha256", pa.string()),
    ("bytes", pa.int64()), ("prompt_tokens", pa.int32()), ("prompt_truncated", pa.bool_()),
    ("negative_prompt_truncated", pa.bool_()), ("render_batch_size", pa.int32()),
    ("generation_seconds", pa.float64()), ("encode_seconds", pa.float64()), ("peak_memory_mb", pa.float64()),
    ("node", pa.string()), ("actor", pa.string()),
    # What rendered the row: the GPU type (Ray's accelerator type; CPU), the precision, the VAE and the
    # attention kernels, so that a dataset rendered by a mixed fleet says which rows came from where.
    ("accelerator_type", pa.string()), ("dtype", pa.string()), ("vae", pa.string()), ("attention", pa.string()),
])  # fmt: skip


def metadata_schema(passthrough: pa.Schema) -> pa.Schema:
    """The schema of every metadata part of a job whose manifest passes `passthrough` through."""
    return pa.schema([*METADATA_FIELDS, *passthrough])


_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY = re.compile(r"[A-Za-z0-9_-]{1,100}")
_HASHED_SHAPE = re.compile(r"(?:.*-)?[0-9a-f]{16}")  # every name `_hashed_name` builds
SHARD_HEX_DIGITS = 2


def id_digest(row_id: str) -> str:
    return hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()


def safe_name(name: str) -> str:
    """A file-name stem for `name`: no separators, no dot-only names, at most 120 characters."""
    if _SAFE.fullmatch(name) and ".." not in name and not _HASHED_SHAPE.fullmatch(name):
        return name
    return _hashed_name(name)


def sample_key(row_id: str) -> str:
    """A row's key: the stem of its image (files layout) and of its tar members (webdataset);
    `[A-Za-z0-9_-]`, at most 120 characters, never a dot (see the module docstring)."""
    if _KEY.fullmatch(row_id) and not _HASHED_SHAPE.fullmatch(row_id):
        return row_id
    return _hashed_name(row_id)


def _hashed_name(name: str) -> str:
    readable = _UNSAFE_CHARS.sub("_", name)[:80].strip("_")
    digest = id_digest(name)[:16]
    return f"{readable}-{digest}" if readable else digest


def shard_of(row_id: str) -> str:
    """The image folder of a row: a fixed-width hex prefix of the id's hash.

    Hashing spreads objects evenly over prefixes (S3 scales request rates per prefix) and,
    unlike a batch number, does not depend on how rows were batched, so a retried row lands
    on the same key.
    """
    return id_digest(row_id)[:SHARD_HEX_DIGITS]


def image_relpath(row_id: str, ext: str) -> str:
    return f"{IMAGES_DIR}/{shard_of(row_id)}/{sample_key(row_id)}.{ext}"


def part_name(ids: list[str]) -> str:
    """A part's name: a digest of its ids, so a retried part rewrites the same objects."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8", "surrogatepass")).hexdigest()
    return f"part-{digest[:20]}"


def metadata_path(root: str, part: str) -> str:
    return join(root, METADATA_DIR, f"{part}.parquet")


def part_stats_path(root: str, part: str) -> str:
    return join(root, STATS_DIR, f"{part}.json")


def shard_relpath(part: str) -> str:
    return f"{SHARDS_DIR}/{part}.tar"


def committed_parts(fs: AbstractFileSystem, root: str) -> list[str]:
    """Paths of the committed metadata parts, sorted."""
    folder = join(root, METADATA_DIR)
    return sorted(fs.glob(join(folder, "part-*.parquet"))) if fs.exists(folder) else []


def part_stats_paths(fs: AbstractFileSystem, root: str) -> list[str]:
    """Paths of the parts' stats records, sorted."""
    folder = join(root, STATS_DIR)
    return sorted(fs.glob(join(folder, "part-*.json"))) if fs.exists(folder) else []


def read_json(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A JSON record under the output; None when it is absent, or damaged (with a warning: a
    damaged record costs what it says, not the command)."""
    try:
        record = json.loads(read_bytes(fs, path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None
    return record if isinstance(record, dict) else None


def write_json(fs: AbstractFileSystem, path: str, record: dict[str, Any]) -> None:
    """Write a JSON record under the output (atomically: see `write_bytes`)."""
    try:
        write_bytes(fs, path, json.dumps(record, indent=2, default=str).encode())
    except OSError as error:
        raise StorageError(f"cannot write to the output {full_uri(fs, path)}: {error}") from error

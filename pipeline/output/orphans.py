"""Objects of interrupted parts: what an output holds that no committed part lists.

A part writes its images (or its tar), then its stats record, then its metadata part, which
commits it. A kill between those steps leaves objects that no metadata part lists: images, a tar,
a stats record, or (local disk) the temporary file of a write cut short. An image is overwritten
when its row is rendered again, but a tar and a stats record are named after the part's rows, so
a resumed job that groups the rows differently never touches them. Nothing reads them as output
(the ledger is the metadata), yet a reader that globs `shards/*.tar` would read their rows twice.

`find_orphans` lists them; `sdxl-batch verify` counts them, and `verify --clean` and the end of
every job (`output.publish`) remove them. Removing is safe only while no job writes into the
output: a running job's uncommitted objects look exactly like orphans.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.io import is_temporary_name, join
from pipeline.core.layout import IMAGES_DIR, METADATA_DIR, RUNS_DIR, SHARDS_DIR, STATS_DIR
from pipeline.output.streaming import bounded_map

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fsspec import AbstractFileSystem

    from pipeline.output.streaming import ImageReferences


@dataclass
class Orphans:
    """Paths (relative to the output root) of objects no committed part lists, by kind."""

    images: list[str] = field(default_factory=list)
    tars: list[str] = field(default_factory=list)
    stats: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.images) + len(self.tars) + len(self.stats) + len(self.temporary)

    def paths(self) -> list[str]:
        return [*self.images, *self.tars, *self.stats, *self.temporary]

    def describe(self) -> str:
        return (
            f"{self.count} ({len(self.images)} images, {len(self.tars)} tars, {len(self.stats)} stats records, "
            f"{len(self.temporary)} temporary files)"
        )


def _relative(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1 :]


def _listing(fs: AbstractFileSystem, root: str, folder: str) -> list[str]:
    path = join(root, folder)
    return sorted(_relative(root, p) for p in fs.find(path)) if fs.exists(path) else []


def find_orphans(
    fs: AbstractFileSystem,
    root: str,
    *,
    parts: set[str],
    tars: set[str],
    images: ImageReferences | None = None,
) -> Orphans:
    """`parts`: the committed part names (`part-<digest>`); `tars`: the `image_path` of every
    committed row of the webdataset layout; `images`: those of the files layout (None: no image
    is referenced). All must come from listings as fresh as this one (`fs.invalidate_cache()`
    first: s3fs caches listings).

    Parts, stats records and tars number O(parts), so they are held in memory; images number
    O(rows), so `images/` is listed and compared one image folder at a time (`streaming`)."""
    orphans = Orphans()
    top = [_relative(root, p) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    orphans.temporary += [p for p in top if is_temporary_name(posixpath.basename(p))]  # job.json, stats.json
    for folder in (METADATA_DIR, STATS_DIR, SHARDS_DIR):
        for relpath in _listing(fs, root, folder):
            name = posixpath.basename(relpath)
            if is_temporary_name(name):
                orphans.temporary.append(relpath)
            elif folder == SHARDS_DIR and relpath not in tars:
                orphans.tars.append(relpath)
            elif (
                folder == STATS_DIR
                and name.endswith(".json")
                and not relpath.startswith(f"{RUNS_DIR}/")  # the runs' records (`output.runs`)
                and name.removesuffix(".json") not in parts
            ):
                orphans.stats.append(relpath)
    for unreferenced, temporary in bounded_map(
        lambda group: _image_orphans(fs, root, *group), _image_groups(fs, root, images), threads=_LISTING_THREADS
    ):
        orphans.images += unreferenced
        orphans.temporary += temporary
    orphans.images.sort()
    orphans.temporary.sort()
    return orphans


# Image folders listed at once: each holds a folder's listing and references in memory.
_LISTING_THREADS = 4


def _image_groups(
    fs: AbstractFileSystem, root: str, images: ImageReferences | None
) -> Iterator[tuple[list[str], list[str], pa.Array]]:
    """(folders, loose files, referenced paths) per partition of `images/`'s folders; loose
    files are the ones directly under `images/`, compared with the `images` folder's references."""
    base = join(root, IMAGES_DIR)
    if not fs.exists(base):
        return
    folders: list[str] = []
    loose: list[str] = []
    for entry in fs.ls(base, detail=True):
        relpath = _relative(root, entry["name"].rstrip("/"))
        if relpath.startswith(f"{IMAGES_DIR}/"):  # not `images/` itself (an object store's folder marker)
            (folders if entry["type"] == "directory" else loose).append(relpath)
    if loose:
        folders.append(IMAGES_DIR)
    if images is None:
        for folder in folders:
            yield [folder], loose, pa.array([], pa.string())
        return
    for group, referenced in images.by_partition(folders):
        yield group, loose, referenced


def _image_orphans(
    fs: AbstractFileSystem, root: str, folders: list[str], loose: list[str], referenced: pa.Array
) -> tuple[list[str], list[str]]:
    """The unreferenced images and the temporary files in `folders`."""
    unreferenced: list[str] = []
    temporary: list[str] = []
    for folder in folders:
        listed = loose if folder == IMAGES_DIR else [_relative(root, p) for p in fs.find(join(root, folder))]
        kept: list[str] = []
        for relpath in listed:
            (temporary if is_temporary_name(posixpath.basename(relpath)) else kept).append(relpath)
        if kept:
            known = pc.is_in(pa.array(kept, pa.string()), value_set=referenced).to_numpy(zero_copy_only=False)
            unreferenced += [relpath for relpath, found in zip(kept, known, strict=True) if not found]
    return unreferenced, temporary


def remove_orphans(fs: AbstractFileSystem, root: str, orphans: Orphans) -> None:
    paths = [join(root, relpath) for relpath in orphans.paths()]
    if paths:
        fs.rm(paths)

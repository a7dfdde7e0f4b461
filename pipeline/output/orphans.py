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

from pipeline.core.io import is_temporary_name, join
from pipeline.core.layout import IMAGES_DIR, METADATA_DIR, SHARDS_DIR, STATS_DIR

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


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


def find_orphans(fs: AbstractFileSystem, root: str, *, referenced: set[str], parts: set[str]) -> Orphans:
    """`referenced`: the `image_path` of every committed row (an image, or a tar in the webdataset
    layout); `parts`: the committed part names (`part-<digest>`). Both must come from listings
    as fresh as this one (`fs.invalidate_cache()` first: s3fs caches listings)."""
    orphans = Orphans()
    top = [_relative(root, p) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    orphans.temporary += sorted(p for p in top if is_temporary_name(posixpath.basename(p)))  # job.json, stats.json
    for folder in (METADATA_DIR, STATS_DIR, IMAGES_DIR, SHARDS_DIR):
        for relpath in _listing(fs, root, folder):
            name = posixpath.basename(relpath)
            if is_temporary_name(name):
                orphans.temporary.append(relpath)
            elif folder == IMAGES_DIR and relpath not in referenced:
                orphans.images.append(relpath)
            elif folder == SHARDS_DIR and relpath not in referenced:
                orphans.tars.append(relpath)
            elif folder == STATS_DIR and name.endswith(".json") and name.removesuffix(".json") not in parts:
                orphans.stats.append(relpath)
    return orphans


def remove_orphans(fs: AbstractFileSystem, root: str, orphans: Orphans) -> None:
    paths = [join(root, relpath) for relpath in orphans.paths()]
    if paths:
        fs.rm(paths)

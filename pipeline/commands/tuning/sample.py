"""The rows every measurement renders: a sample of the job's own manifest, with its mix.

A real manifest mixes sizes, step counts, guidance and negative prompts, and each settings group
is a model call of its own; a sample of its first rows would measure whatever the manifest starts
with. So the sample takes from each (width, height, steps, guidance) group as many rows as its
share of the pending rows (at least one per group that has any), read in manifest order until
every group has its share or READ_LIMIT rows were read, then fills from what was read, shuffles
with a fixed seed, and repeats itself with new ids and seeds if the manifest is smaller than the
sample. The first QUALITY_ROWS rows are what the quality gate compares.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.core.errors import ConfigError
from pipeline.plan.job import plan_job
from pipeline.plan.manifest import rules_for
from pipeline.plan.rows import iter_pending
from pipeline.plan.settings import fill_settings

if TYPE_CHECKING:
    from pipeline.plan.job import JobPlan

READ_LIMIT = 200_000  # rows read at most while looking for every group's share
SEED = 20231205


def group_key(row: dict[str, Any]) -> tuple[int, int, int, float]:
    return (int(row["width"]), int(row["height"]), int(row["steps"]), float(row["guidance_scale"]))


def sample_manifest(job: JobPlan, rows: int) -> pa.Table:
    """`rows` rows of the job's pending rows (all of the manifest's valid rows when none is
    pending), with their settings filled in and the manifest's mix (see the module docstring)."""
    config = job.config
    plan = job if job.pending_rows else plan_job(config, overwrite=True)
    groups = plan.render_groups()
    total = sum(count for _, count in groups) or 1
    wanted = {key: max(1, round(rows * count / total)) for key, count in groups}
    taken: dict[tuple[int, int, int, float], list[dict[str, Any]]] = {key: [] for key in wanted}
    spare: list[dict[str, Any]] = []
    read = 0
    for table in iter_pending(plan.manifest, config.storage, rules_for(plan.preset)):
        for row in fill_settings(table, plan.defaults).to_pylist():
            key = group_key(row)
            bucket = taken.setdefault(key, [])
            (bucket if len(bucket) < wanted.get(key, 0) else spare).append(row)
        read += table.num_rows
        if read >= READ_LIMIT or all(len(taken[key]) >= n for key, n in wanted.items()):
            break
    chosen = [row for bucket in taken.values() for row in bucket]
    chosen += spare[: max(0, rows - len(chosen))]
    if not chosen:
        raise ConfigError(f"the manifest {config.manifest} has no valid rows to sample")
    random.Random(SEED).shuffle(chosen)
    return _repeated(pa.Table.from_pylist(chosen[:rows]), rows)


def _repeated(sample: pa.Table, rows: int) -> pa.Table:
    """The sample repeated with new ids and seeds up to `rows` rows."""
    copies = [sample]
    while sum(t.num_rows for t in copies) < rows:
        k = len(copies)
        copy = sample.set_column(
            sample.schema.get_field_index("id"), "id", pa.array([f"{i}~{k}" for i in sample.column("id").to_pylist()])
        )
        seeds = [(s + k) % 2**63 for s in sample.column("seed").to_pylist()]
        copies.append(copy.set_column(copy.schema.get_field_index("seed"), "seed", pa.array(seeds, pa.int64())))
    return pa.concat_tables(copies).slice(0, rows)


def sample_groups(sample: pa.Table) -> list[dict[str, Any]]:
    """The sample's mix: rows per (width, height, steps, guidance, negative prompt or not)."""
    counts: Counter[tuple[Any, ...]] = Counter()
    for row in sample.select(["width", "height", "steps", "guidance_scale", "negative_prompt"]).to_pylist():
        counts[(*group_key(row), bool(row["negative_prompt"]))] += 1
    return [
        {"width": w, "height": h, "steps": s, "guidance_scale": g, "negative_prompt": n, "rows": count}
        for (w, h, s, g, n), count in sorted(counts.items())
    ]


def sample_digest(sample: pa.Table, quality_rows: int) -> str:
    """What a measurement's figures depend on in the sample: its mix and size, and the prompts and
    seeds of the rows the quality gate compares (the cache's key)."""
    quality = sample.slice(0, quality_rows).select(["prompt", "negative_prompt", "seed"]).to_pylist()
    what = {"groups": sample_groups(sample), "rows": sample.num_rows, "quality": quality}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

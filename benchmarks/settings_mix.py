"""Model calls and padded rows per 1,000 images for a manifest that mixes render settings.

    .venv/bin/python benchmarks/settings_mix.py [--rows 100000] [--batch 8] [--row-group 10000]

A real manifest mixes sizes, step counts and negative prompts row by row. The generators take the
read stage's output in batches of the actor's batch size (`max(batch_sizes)`), and make one model
call per settings group in each batch (`run.stages.contiguous_groups`); with `compile` each call
runs padded (`ImageGenerator._padded`). This replays that path on the real functions, without a
model: the read stage's order of each row group (`plan.settings.order_by_settings`, or the
manifest's order as before), batches of `--batch` rows, the groups per batch, and per call the rows
the UNet runs: the call's rows eager, the next power of two with `compile` (`padded_size`), or the
whole batch with `compile` as before. The mix: three sizes (1024x1024, 832x1216, 1216x832), two
step counts (4, 8), guidance 1.5 (classifier-free guidance runs, so a negative prompt is its own
group) and half the rows with a negative prompt: 12 settings groups, drawn at random per row.
Appends to benchmarks/results/settings_mix.md (`--out`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.models.techniques import padded_size
from pipeline.plan.settings import SettingDefaults, fill_settings, order_by_settings
from pipeline.run.stages import contiguous_groups

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "settings_mix.md"
SIZES = [(1024, 1024), (832, 1216), (1216, 832)]


def manifest(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    size = rng.integers(0, len(SIZES), rows)
    return pa.table({
        "id": [f"r{i}" for i in range(rows)],
        "width": pa.array([SIZES[s][0] for s in size], pa.int32()),
        "height": pa.array([SIZES[s][1] for s in size], pa.int32()),
        "steps": pa.array(rng.choice([4, 8], rows), pa.int32()),
        "guidance_scale": pa.array(np.full(rows, 1.5)),
        "negative_prompt": [("blurry, low quality" if n else None) for n in rng.random(rows) < 0.5],
    })  # fmt: skip


def replay(table: pa.Table, *, ordered: bool, batch: int, row_group: int) -> dict[str, float]:
    """Calls and UNet rows over the whole table, per the read order and padding rule."""
    defaults = SettingDefaults(1024, 1024, 4, 1.5)
    read = []
    for start in range(0, table.num_rows, row_group):  # a read task per row group
        group = fill_settings(table.slice(start, row_group), defaults)
        read.append(order_by_settings(group) if ordered else group)
    stream = pa.concat_tables(read)
    calls = eager_rows = bucket_rows = full_rows = 0
    for start in range(0, stream.num_rows, batch):  # the generators' batches
        _, groups = contiguous_groups(stream.slice(start, batch))
        for _, (lo, hi) in groups:  # one model call per group (a group never exceeds the batch here)
            rows = hi - lo
            calls += 1
            eager_rows += rows
            bucket_rows += min(batch, padded_size(rows))
            full_rows += batch
    per = 1000 / stream.num_rows
    return {
        "calls": calls * per,
        "eager_rows": eager_rows * per,
        "bucket_rows": bucket_rows * per,
        "full_rows": full_rows * per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--row-group", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file to append to")
    args = parser.parse_args()
    table = manifest(args.rows)
    before = replay(table, ordered=False, batch=args.batch, row_group=args.row_group)
    after = replay(table, ordered=True, batch=args.batch, row_group=args.row_group)
    lines = [
        f"| manifest order (before), compile pads to the batch | {before['calls']:.0f} | {before['eager_rows']:.0f} "
        f"| {before['full_rows']:.0f} | {before['full_rows'] - 1000:.0f} |",
        f"| manifest order, compile pads to powers of two | {before['calls']:.0f} | {before['eager_rows']:.0f} "
        f"| {before['bucket_rows']:.0f} | {before['bucket_rows'] - 1000:.0f} |",
        f"| runs of equal settings (after), compile pads to powers of two | {after['calls']:.0f} "
        f"| {after['eager_rows']:.0f} | {after['bucket_rows']:.0f} | {after['bucket_rows'] - 1000:.0f} |",
    ]
    header = [
        "",
        f"{args.rows:,} rows, 12 settings groups drawn at random per row, batch {args.batch}, row groups of "
        f"{args.row_group:,} (`benchmarks/settings_mix.py`, {os.cpu_count()} CPUs; no model runs: the counts "
        "come from the read order, the batching and the padding rule)",
        "",
        "| read order and padding | model calls per 1,000 images | UNet rows eager | UNet rows with compile "
        "| padded rows with compile |",
        "|---|---:|---:|---:|---:|",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text("# Batches of one settings group\n")
    with args.out.open("a") as handle:
        handle.write("\n".join(header + lines) + "\n")
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()

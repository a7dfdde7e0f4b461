"""Pipeline overhead: the same N tiny-model images through a bare diffusers loop and through
`sdxl-batch run`, in one run, start-up included on both sides.

    .venv/bin/python benchmarks/overhead.py [--rows 1500] [--batch-size 4]

The bare loop is what a user would write by hand: load the pipeline, call it per batch with one
seeded CPU generator per row, save each PIL image as PNG. `sdxl-batch run` is timed as a user
sees it: a fresh process, an embedded Ray, the actor pool, encode and write stages, metadata and
stats. Prints a markdown table and writes it to benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def bare_loop(model_dir: Path, rows: list[dict[str, object]], batch_size: int, out: Path) -> float:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        images = pipe(
            prompt=[str(r["prompt"]) for r in batch],
            num_inference_steps=4,
            guidance_scale=0.0,
            width=128,
            height=128,
            generator=[torch.Generator("cpu").manual_seed(int(str(r["seed"]))) for r in batch],
        ).images
        for row, image in zip(batch, images, strict=True):
            image.save(out / f"{row['id']}.png")
    return time.perf_counter() - start


def pipeline_run(config: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/sdxl-batch"), "run", str(config), "--no-progress"], check=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from pipeline.models.tiny import TINY_VERSION, build_tiny_pipeline
    from pipeline.models.weights import default_cache_dir, materialize

    model_dir = materialize(default_cache_dir(None), f"tiny-v{TINY_VERSION}", build_tiny_pipeline)
    work = Path(tempfile.mkdtemp(prefix="sdxl-batch-overhead-"))
    rows = [{"id": f"row-{i:06d}", "prompt": f"a photo of a red dog number {i}", "seed": i} for i in range(args.rows)]
    pq.write_table(pa.Table.from_pylist(rows), work / "manifest.parquet")
    config = work / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "manifest": str(work / "manifest.parquet"),
                "output": str(work / "pipeline-out"),
                "model": {"preset": "tiny"},
                "generation": {"batch_size": args.batch_size},
                "write": {"rows_per_part": 64},
            }
        )
    )
    bare = bare_loop(model_dir, rows, args.batch_size, work / "bare-out")
    ours = pipeline_run(config)
    stats = json.loads((work / "pipeline-out" / "stats.json").read_text())
    assert stats["rows"] == args.rows, stats
    from pipeline.verify import verify_output

    report = verify_output(str(work / "pipeline-out"), manifest=str(work / "manifest.parquet"))
    assert report.ok, report.summary()  # the timed run produced every row exactly once
    bare_rate, our_rate = args.rows / bare, args.rows / ours
    table = "\n".join(
        [
            f"Overhead benchmark: {args.rows} tiny-model images (128x128, 4 steps), batch size {args.batch_size}, "
            f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}",
            "",
            "| path | wall s (start-up included) | images/s | ratio |",
            "|---|---:|---:|---:|",
            f"| bare diffusers loop (generate, PNG, write) | {bare:.1f} | {bare_rate:.2f} | 1.00 |",
            f"| sdxl-batch run (Ray, actor, encode, write, metadata) | {ours:.1f} | {our_rate:.2f} | "
            f"{our_rate / bare_rate:.2f} |",
            "",
            f"Generator actor busy fraction (model calls / its working span): {stats['busy_fraction']:.3f}; "
            f"{stats['generation_images_per_second']:.2f} images/s from its first call to its last "
            f"({stats['wall_seconds'] - stats['generation_span_seconds']:.1f} s of the run before the first call ended "
            "or after the last: Ray, model loading, planning, the last parts).",
            "",
            f"sdxl-batch stage seconds (summed over workers): {stats['stage_seconds']}",
        ]
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.md").write_text(table + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

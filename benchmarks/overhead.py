"""Pipeline overhead: the same N tiny-model images through a bare diffusers loop and through
`sdxl-batch run`, in one run, start-up included on both sides.

    .venv/bin/python benchmarks/overhead.py [--rows 1500] [--batch-size 4] [--repeat 3]
    .venv/bin/python benchmarks/overhead.py --rows 96     # a short job: start-up is most of it

The bare loop is what a user would write by hand: read the manifest, load the pipeline, call it
per batch with one seeded CPU generator per row, save each PIL image as PNG. Both sides are timed
the same way, as a user sees them: from launching a fresh Python process to its exit (interpreter
start and the torch/diffusers imports included on both). `sdxl-batch run` adds an embedded Ray,
the actor pool, encode and write stages, metadata and stats. Prints a markdown table and writes it
to benchmarks/results/overhead.md, one section per number of rows (a run replaces its own size's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def bare_loop(model_dir: Path, manifest: Path, batch_size: int, out: Path) -> float:
    """The hand-written loop; returns the seconds from loading the model to the last file."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    rows = pq.read_table(manifest).to_pylist()
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


def bare_run(model_dir: Path, manifest: Path, batch_size: int, out: Path) -> tuple[float, float]:
    """The bare loop in a fresh process: (seconds from launch to exit, seconds of the loop alone)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--bare", str(model_dir), str(manifest), str(out), "--batch-size", str(batch_size)],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, float(result.stdout.split()[-1])


def pipeline_run(config: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/sdxl-batch"), "run", str(config), "--no-progress"], check=True, cwd=REPO)
    return time.perf_counter() - start


def _ours_total(round_: tuple[float, float, float, dict[str, object]]) -> float:
    return round_[2]


def _breakdown(stats: dict[str, object]) -> str:
    phases = stats.get("wall_breakdown_seconds") or {}
    assert isinstance(phases, dict)
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())


def _sections(text: str) -> dict[int, str]:
    """The results file's sections, by number of rows (`## N images`); an older file with one
    unheaded table is kept as the section of the rows it names."""
    sections: dict[int, str] = {}
    for chunk in text.split("\n## ")[1:] if "\n## " in text or text.startswith("## ") else []:
        head = chunk.removeprefix("## ")
        sections[int(head.split()[0])] = "## " + head.strip() + "\n"
    if not sections and text.startswith("Overhead benchmark: "):
        sections[int(text.split()[2])] = f"## {text.split()[2]} images\n\n" + text.strip() + "\n"
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, bare and sdxl-batch alternated")
    parser.add_argument("--bare", nargs=3, metavar=("MODEL", "MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:  # the bare side's own process
        model, manifest, out = map(Path, args.bare)
        print(bare_loop(model, manifest, args.batch_size, out))
        return

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
    from pipeline.output.verify import verify_output

    rounds = []
    for index in range(args.repeat):  # alternated, so a slow spell of the machine hits both sides
        for side in ("bare-out", "pipeline-out"):
            shutil.rmtree(work / side, ignore_errors=True)
        bare, bare_loop_only = bare_run(model_dir, work / "manifest.parquet", args.batch_size, work / "bare-out")
        ours = pipeline_run(config)
        stats = json.loads((work / "pipeline-out" / "stats.json").read_text())
        assert stats["rows"] == args.rows, stats
        report = verify_output(str(work / "pipeline-out"), manifest=str(work / "manifest.parquet"))
        assert report.ok, report.summary()  # the timed run produced every row exactly once
        rounds.append((bare, bare_loop_only, ours, stats))
        print(f"round {index + 1}: bare {bare:.1f} s, sdxl-batch {ours:.1f} s, ratio {bare / ours:.3f}", flush=True)
    ratios = sorted(bare / ours for bare, _, ours, _ in rounds)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1 :][:2]) / 2
    lines = [
        f"## {args.rows} images",
        "",
        f"Overhead benchmark: {args.rows} tiny-model images (128x128, 4 steps), batch size {args.batch_size}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"{args.repeat} round(s), bare and sdxl-batch alternated. Wall seconds run from process launch to exit.",
        "",
        "| round | bare diffusers loop s | images/s | sdxl-batch run s | images/s | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, (bare, _, ours, _) in enumerate(rounds):
        lines.append(
            f"| {index + 1} | {bare:.1f} | {args.rows / bare:.2f} | {ours:.1f} | {args.rows / ours:.2f} | "
            f"{bare / ours:.3f} |"
        )
    lines += [f"| **median** | | | | | **{median:.3f}** |", ""]
    for index, (bare, bare_loop_only, _ours, stats) in enumerate(rounds):
        lines.append(
            f"- Round {index + 1}: the bare process spent {bare - bare_loop_only:.1f} s starting and importing torch "
            f"and diffusers, then {bare_loop_only:.1f} s from model load to the last file; sdxl-batch "
            f"({'in its own process' if stats.get('runner') == 'in_process' else 'on an embedded Ray'}), "
            "its generator: "
            f"busy fraction {stats['busy_fraction']:.3f} (model calls / its working span), "
            f"{stats['seconds_per_image'] * 1000:.1f} ms per image in model calls, "
            f"{stats['generation_images_per_second']:.2f} images/s from its first call to its last, "
            f"{stats['wall_seconds'] - stats['generation_span_seconds']:.1f} s of the run before the first call "
            "ended or after the last (start-up: planning, Ray where it ran, the model's load; the last parts); "
            "the process ran "
            f"{_ours_total(rounds[index]) - stats['wall_seconds']:.1f} s outside the job (interpreter, imports, exit). "
            f"Wall time by phase: {_breakdown(stats)}."
        )
    lines += ["", f"sdxl-batch stage seconds of the last round (summed over workers): {rounds[-1][3]['stage_seconds']}"]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "overhead.md"
    sections = _sections(path.read_text() if path.exists() else "")
    sections[args.rows] = table.strip() + "\n"
    intro = "# Pipeline overhead: sdxl-batch run against a bare diffusers loop (benchmarks/overhead.py)\n"
    path.write_text(intro + "".join(f"\n{sections[rows]}" for rows in sorted(sections)))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

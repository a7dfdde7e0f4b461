"""Steady-state cost of a LoRA preset against its full-UNet counterpart, on tiny artifacts.

    .venv/bin/python benchmarks/lora_fusion.py [--batches 30] [--batch-size 4]

`lightning-lora-4step` (LoRA fused into the base at load, adapters unloaded) against
`lightning-4step` (a full UNet checkpoint), plus the LoRA left unfused for reference. The runs
are interleaved batch by batch so that machine noise hits all three alike. Loads from a tiny
Hugging Face cache (real repo and file names, random weights) with HF_HUB_OFFLINE=1. Writes
benchmarks/results/lora_fusion.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    hub = tempfile.mkdtemp(prefix="tiny-hub-")
    os.environ.update(HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1")  # before huggingface_hub is imported

    import torch

    from pipeline.core.config import ModelConfig
    from pipeline.core.render import RenderSettings
    from pipeline.models.generator import ImageGenerator
    from pipeline.models.tiny import build_tiny_hub

    build_tiny_hub(hub)
    variants = {
        "lightning-4step (full UNet)": ModelConfig(preset="lightning-4step"),
        "lightning-lora-4step (fused)": ModelConfig(preset="lightning-lora-4step"),
        "lightning-lora-4step (unfused)": ModelConfig(preset="lightning-lora-4step", fuse_loras=False),
    }
    generators = {}
    for name, config in variants.items():
        generators[name] = ImageGenerator(config)
        generators[name].load()
    settings = RenderSettings(128, 128, 4, 0.0)
    prompts = ["a photo of a red dog"] * args.batch_size
    times: dict[str, list[float]] = {name: [] for name in variants}
    for batch in range(args.batches + 2):
        for name, generator in generators.items():
            seeds = list(range(batch * args.batch_size, (batch + 1) * args.batch_size))
            start = time.perf_counter()
            generator.generate(prompts, [None] * args.batch_size, seeds, settings)
            if batch >= 2:  # two warm-up batches
                times[name].append((time.perf_counter() - start) / args.batch_size)
    full = statistics.median(times["lightning-4step (full UNet)"])
    lines = [
        f"LoRA fusion: median seconds per image over {args.batches} interleaved batches of {args.batch_size} "
        f"(tiny artifacts, 128x128, 4 steps), {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
        "",
        "| variant | s/image (median) | ratio to full UNet |",
        "|---|---:|---:|",
    ]
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(f"| {name} | {median:.4f} | {median / full:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_fusion.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

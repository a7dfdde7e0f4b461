"""Load time and host memory of a single-file UNet: the old path against the streaming loader.

    .venv/bin/python benchmarks/load_time.py                     # full-size SDXL UNet, ~5.1 GB fp16 file
    .venv/bin/python benchmarks/load_time.py --size tiny --repeats 1 --out /tmp/t.md   # seconds (smoke test)

Builds a checkpoint of SDXL base 1.0's UNet architecture (its public config) with random fp16
values, in diffusers' key layout, as the published Lightning UNets are, and saves it with
safetensors (under /tmp unless `--checkpoint PATH`; removed at the end unless `--keep`). Then
measures, each in a fresh process with `OMP_NUM_THREADS=1` and `torch.set_num_threads(1)` (what
Ray gives a GPU actor) and after a warm-up read of the whole file (so the file is in the page
cache: disk speed is left out, and every method reads it the same way):

- read (pread): `safetensors.torch.load_file(path, backend="pread")`, every tensor's bytes read
  into memory of the process: the reference for the time target;
- read (mmap): `load_file(path)` and one byte of every page touched: mapping the file's pages in;
- old path: `from_config` (a random float32 UNet) + `load_state_dict` + a cast (`--skip-old`);
- the new loader (`pipeline.models.loading.load_unet_file`) to float16 and bfloat16 on the CPU
  (and CUDA when present), with safetensors' pread and mmap backends.

Per measurement: wall and CPU seconds of the process (medians over `--repeats` rounds; each round
runs every method once, so that the machine's drift hits all alike), peak RSS (VmHWM, reset when
loading starts) and peak anonymous memory (RssAnon, sampled every 5 ms by a thread), both above
what the process held when loading started. RSS counts the file's pages while they are mapped
(page cache: shared by the actors of a node and reclaimable); anonymous memory is the process's
own. Targets (issue 13): load time <= 2x the read (pread), peak host memory <= 1.3x the
checkpoint's size. Writes a markdown table to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30
TIME_TARGET = 2.0  # x the read (pread)
MEMORY_TARGET = 1.3  # x the checkpoint's size
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), as in gpu_throughput.py.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
# The same layout in miniature (pipeline/models/tiny.py's UNet).
TINY_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 64), "attention_head_dim": (2, 4),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2), "cross_attention_dim": 64, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
}  # fmt: skip
CONFIGS = {"full": SDXL_UNET, "tiny": TINY_UNET}


@dataclass(frozen=True)
class Method:
    """One measured way of getting the checkpoint's tensors into memory."""

    label: str
    kind: str  # read-pread, read-mmap, old, new
    dtype: str = "float16"
    device: str = "cpu"
    backend: str = "pread"

    @property
    def name(self) -> str:
        """What `--methods` selects it by: read-pread, read-mmap, old, new-DTYPE-BACKEND-DEVICE."""
        return f"new-{self.dtype}-{self.backend}-{self.device}" if self.kind == "new" else self.kind


def methods(*, skip_old: bool, cuda: bool) -> list[Method]:
    found = [Method("read (pread): load_file, every tensor read into memory", "read-pread")]
    found.append(Method("read (mmap): load_file, every page touched", "read-mmap"))
    if not skip_old:
        found.append(Method("old: from_config + load_state_dict + cast", "old", "bfloat16"))
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        for dtype in ("float16", "bfloat16"):
            for backend in ("pread", "mmap"):
                found.append(Method(f"new: load_unet_file (safetensors {backend})", "new", dtype, device, backend))
    return found


# --- The measured process --------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                values[key] = int(value.split()[0]) * 1024
    return values


class AnonSampler(threading.Thread):
    """Peak RssAnon of this process, sampled every 5 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _status()["RssAnon"]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, _status()["RssAnon"])


def _loader(method: Method, path: str, config: dict[str, Any]) -> Callable[[], Any]:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pipeline.models.loading import load_unet_file

    dtype = getattr(torch, method.dtype)
    with torch.device("meta"):  # diffusers imports its modules lazily: not part of the loading time
        UNet2DConditionModel.from_config(config)
    if method.kind == "read-pread":
        return lambda: load_file(path, backend="pread")
    if method.kind == "read-mmap":
        return lambda: [int(t.view(-1).view(torch.uint8)[::4096].sum()) for t in load_file(path).values()]
    if method.kind == "old":

        def old() -> Any:
            unet = UNet2DConditionModel.from_config(config)
            unet.load_state_dict(load_file(path))
            return unet.to(dtype)

        return old

    def new() -> Any:
        unet = load_unet_file(config, path, dtype=dtype, device=method.device, backend=method.backend)  # type: ignore[arg-type]
        if method.device == "cuda":
            torch.cuda.synchronize()
        return unet

    return new


def measure(method: Method, path: str, size: str) -> dict[str, float]:
    """Load once in this process; its seconds and peak memory above the start of loading."""
    import resource

    import torch

    torch.set_num_threads(1)
    load = _loader(method, path, CONFIGS[size])
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    start = _status()
    sampler = AnonSampler()
    sampler.start()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - began
    used = resource.getrusage(resource.RUSAGE_SELF)
    peak_anon = sampler.stop()
    del result
    return {
        "seconds": seconds,
        "cpu_seconds": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "peak_rss": _status()["VmHWM"] - start["VmRSS"],
        "peak_anon": peak_anon - start["RssAnon"],
    }


# --- The driver --------------------------------------------------------------------------------


def build_checkpoint(path: Path, size: str) -> None:
    """A random fp16 checkpoint of the UNet in a few hundred MB of memory: the UNet is built on the
    meta device (shapes only) and every tensor's bytes are a slice, at a random offset, of one
    pool of normal values, written straight from that pool by safetensors' `serialize_file`."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import TensorSpec, serialize_file

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in UNet2DConditionModel.from_config(CONFIGS[size]).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    needed, free = 2 * sum(s.numel() for s in shapes.values()), shutil.disk_usage(path.parent).free
    print(f"building {path}: {needed / GIB:.2f} GiB, {free / GIB:.0f} GiB free on its disk", flush=True)
    if free < needed * 1.1:
        raise SystemExit(f"not enough disk space for the checkpoint under {path.parent}; pass --checkpoint PATH")
    generator = torch.Generator().manual_seed(0)
    spread = 1 << 22
    pool = (torch.randn(max(s.numel() for s in shapes.values()) + spread, generator=generator) * 0.02).half()
    specs = {}
    for name, shape in shapes.items():
        offset = int(torch.randint(0, spread, (), generator=generator))
        start = pool.data_ptr() + offset * pool.element_size()
        nbytes = shape.numel() * pool.element_size()
        specs[name] = TensorSpec(dtype="float16", shape=list(shape), data_ptr=start, data_len=nbytes)
    serialize_file(specs, str(path))  # `pool` stays alive while the specs point into it


def warm(path: Path) -> None:
    """Read the whole file once, so that it is in the page cache for the measurement."""
    with open(path, "rb", buffering=0) as file:
        while file.read(64 << 20):
            pass


def run_child(method: Method, path: Path, size: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, __file__, "--measure", json.dumps(method.__dict__), "--checkpoint", str(path)]
    result = subprocess.run([*command, "--size", size], env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{method.label} failed:\n{result.stderr[-3000:]}")
    measured: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def run_rounds(plan: list[Method], path: Path, size: str, repeats: int) -> list[tuple[Method, dict[str, float]]]:
    """Every method once per round, `repeats` rounds (the old path in the first only), so that
    the machine's drift hits all alike; per method the median times and the largest peaks."""
    runs: dict[Method, list[dict[str, float]]] = {method: [] for method in plan}
    for round_ in range(repeats):
        for method in plan:
            if method.kind == "old" and round_:
                continue
            warm(path)
            runs[method].append(run_child(method, path, size))
            print(
                f"  round {round_ + 1}: {method.label}, {method.dtype}: {runs[method][-1]['seconds']:.2f} s", flush=True
            )
    return [(method, summary(found)) for method, found in runs.items()]


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "peak_rss": max(r["peak_rss"] for r in runs),
        "peak_anon": max(r["peak_anon"] for r in runs),
        "runs": len(runs),
    }


def _gib(value: float) -> str:
    return f"{value / GIB:.3f}" if value >= GIB / 100 else f"{value / 2**20:.1f} MiB"


def _seconds(value: float) -> str:
    """Two decimals, or three significant digits under 0.1 s (a tiny checkpoint reads in a millisecond)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def table(rows: list[tuple[Method, dict[str, float]]], checkpoint_bytes: int) -> list[str]:
    read = next(r for m, r in rows if m.kind == "read-pread")
    lines = [
        "| method | dtype | device | runs | s (median) | x read | CPU s | x read | peak RSS GiB | x file "
        "| peak anon GiB | x file | time target | memory target (RSS / anon) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for method, r in rows:
        ratio, cpu_ratio = r["seconds"] / read["seconds"], r["cpu_seconds"] / read["cpu_seconds"]
        rss, anon = r["peak_rss"] / checkpoint_bytes, r["peak_anon"] / checkpoint_bytes
        loads = method.kind in ("old", "new")
        time_ok = ("yes" if ratio <= TIME_TARGET else "**no**") if loads else "reference"
        memory_ok = " / ".join("yes" if x <= MEMORY_TARGET else "**no**" for x in (rss, anon)) if loads else ""
        lines.append(
            f"| {method.label} | {method.dtype if loads else 'as stored'} | {method.device} | {int(r['runs'])} "
            f"| {_seconds(r['seconds'])} | {ratio:.2f} | {_seconds(r['cpu_seconds'])} | {cpu_ratio:.2f} "
            f"| {_gib(r['peak_rss'])} | {rss:.2f} | {_gib(r['peak_anon'])} | {anon:.2f} | {time_ok} | {memory_ok} |"
        )
    return lines


def header(args: argparse.Namespace, checkpoint: Path, tensors: int) -> list[str]:
    import diffusers
    import safetensors
    import torch

    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    size = checkpoint.stat().st_size
    return [
        f"# Single-file UNet load time ({args.size})",
        "",
        f"Command: `python benchmarks/load_time.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"safetensors {safetensors.__version__}; CPU: {cpu or platform.processor()} ({os.cpu_count()} cores, shared "
        "with other work: times vary by tens of per cent between runs); `OMP_NUM_THREADS=1`.  ",
        f"Checkpoint: {args.size} SDXL UNet, {tensors} fp16 tensors, {size / GIB:.3f} GiB ({size / 1e9:.2f} GB) "
        "safetensors. Every run is a fresh process started after a warm-up read of the whole file: the file was "
        "warm in the page cache (disk speed is left out).  ",
        "Peaks are above the process's memory when loading started (imports, config). Peak RSS includes the "
        "file's pages while they are mapped (page cache, shared by a node's actors, reclaimable); peak anon "
        "(RssAnon, sampled every 5 ms) is the process's own memory. Targets: time <= "
        f"{TIME_TARGET:g}x read (pread), peak memory <= {MEMORY_TARGET:g}x the file.",
        "",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(CONFIGS), default="full")
    parser.add_argument("--checkpoint", type=Path, help="reuse this checkpoint (built there if missing; kept)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint built under /tmp")
    parser.add_argument("--skip-old", action="store_true", help="leave out the old path (minutes, ~15 GB)")
    parser.add_argument(
        "--methods", help="only these, and the read reference (comma-separated: read-mmap, old, new-bfloat16-pread-cpu)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="processes per method (the old path runs once)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/load_time[-tiny].md")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a child process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.measure:
        print(json.dumps(measure(Method(**json.loads(args.measure)), str(args.checkpoint), args.size)))
        return
    import torch

    folder = None if args.checkpoint else Path(tempfile.mkdtemp(prefix="load-time-"))
    checkpoint = args.checkpoint or folder / "unet.safetensors"  # type: ignore[operator]
    try:
        if not checkpoint.exists():
            build_checkpoint(checkpoint, args.size)
        from safetensors import safe_open

        with safe_open(str(checkpoint), "pt") as file:
            tensors = len(list(file.keys()))
        plan = methods(skip_old=args.skip_old, cuda=torch.cuda.is_available())
        if args.methods:
            plan = [m for m in plan if m.name in args.methods.split(",") or m.kind == "read-pread"]
        rows = run_rounds(plan, checkpoint, args.size, args.repeats)
        text = "\n".join(header(args, checkpoint, tensors) + table(rows, checkpoint.stat().st_size)) + "\n"
    finally:
        if folder is not None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder is not None:
            print(f"kept {checkpoint}")
    print(text)
    out = args.out or RESULTS / f"load_time{'' if args.size == 'full' else '-tiny'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

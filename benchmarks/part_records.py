"""The driver's cost per committed part, and the CPU cost of encoding and writing an image: the
measurements behind docs/scale.md.

    .venv/bin/python benchmarks/part_records.py            # ~9 min on 2 cores
    .venv/bin/python benchmarks/part_records.py --records 200 --memory-records 100,200 --ray 40:1,200:20,40:1:2 \\
        --encode-images 1 --size 256 --write-rows 8 --graph-slices 4 --out /tmp/t.md   # ~30 s (smoke test)

What it measures, on this machine:

- **The driver's loop per part record** (`pipeline.run.runner._execute`): for every summary row
  the write stage emits (`{"rows", "record"}`, one per committed part), `to_pylist()` of the
  Arrow batch it arrives in, `PartStats.from_json`, `JobStats.add_part` and a tqdm update, in µs
  per record. The records are synthetic but made by the pipeline's own code as the write stage
  makes them: per part, `rows_per_part / batch_size` generator batches (`PartStats.of_batch`, one
  model call each, 10 images/s per GPU, four phase timings, GPU utilisation and memory), from
  `--actors-per-part` actors drawn from `--gpus` GPUs at `--gpus-per-node` per node (Ray's 32- and
  56-hex-digit actor and node ids), added to the part's own summary (rows, bytes, seconds,
  rows per actor and node) as `PartWriter` does. `--distinct` records are built and cycled
  (each is parsed anew every time, so nothing is cached).
- **The driver's memory per part record**: what a `JobStats` holds (tracemalloc) after N
  records, with `--gpus` and with 8 GPUs, to separate what grows with parts from what grows
  with actors; and the end-of-job publish of the files layout, which holds every committed
  image path in a set (`output.publish`), per path.
- **Ray Data's part**: the driver iterating `iter_batches(batch_size=None, batch_format="pyarrow")`
  over `ray.data.from_items(rows).map_batches(identity)` on the embedded local Ray the CLI
  starts (`run.session.init_ray`), doing the loop above on every row: wall time and the driver
  process's CPU time (every thread: the streaming executor's too), from the first batch on. Run
  with one row per block (the write stage's output: one block per part), with many rows per
  block, and through three unfused stages; a least-squares fit gives a cost per task (a block
  through one stage) and a cost per row (`cpu = tasks * t + rows * r`), and the share of the
  driver's CPU in threads that run Python (one GIL) is read from /proc.
- **How the graph cuts rows into tasks and parts**: the builder's stages with stand-ins (read
  tasks of `--row-group-rows` cut into slices of `--slice-rows`, actors that emit `--size`² RGB
  pixels, an encoder that emits smooth-PNG-sized bytes, a writer that counts its rows), with the
  builder's batch sizes and CPU reservations, at byte sizes divided by `--graph-scale` (Ray
  Data's block size limit too, so blocks split where they would at full size): tasks per stage
  per part, and the parts' sizes.
- **Image encoding**: `pipeline.run.encoding.encode_batch` (the encode stage: PIL encode and
  sha256) on `--size`² images in PNG, JPEG and WebP at quality 95, in CPU ms per image (one
  core: every encoder here is single-threaded) and bytes per image. The pixels are synthetic, a
  smooth colour field (products of sines over 150-210 px) plus Gaussian noise: sigma 2 (smooth,
  like a studio render) and sigma 8 (textured, like foliage or film grain).
- **The write stage**: `PartWriter.write` of a part of those PNGs to local disk (tmpfs or disk
  under /tmp), files and webdataset layouts, in CPU ms per row (metadata, tar, Parquet; no S3).

Writes a markdown report to --out (default benchmarks/results/part_records.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.output.stats import JobStats, PartStats
from pipeline.output.writer import ModelInfo, PartWriter
from pipeline.run.encoding import encode_batch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FORMATS = ("png", "jpeg", "webp")
NOISE = {"smooth (sigma 2)": 2.0, "textured (sigma 8)": 8.0}
PHASES = {"text_encode": 0.02, "denoise": 0.78, "vae_decode": 0.18, "to_host": 0.02}  # shares of a call
IMAGES_PER_SECOND = 10.0  # per GPU: the target the records are timed at
# What every metadata row records about the model, as configs/lightning-4step.yaml makes it.
MODEL = ModelInfo(
    model="lightning-4step",
    scheduler="EulerDiscreteScheduler(timestep_spacing=trailing)",
    weights="stabilityai/stable-diffusion-xl-base-1.0 + hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
)


@dataclass(frozen=True)
class Cluster:
    """Ray ids of a cluster's generator actors: one per GPU, `gpus_per_node` per node."""

    actors: list[str]
    nodes: list[str]
    gpus_per_node: int

    @classmethod
    def of(cls, gpus: int, gpus_per_node: int, rng: np.random.Generator) -> Cluster:
        def hex_id(digits: int) -> str:
            return rng.bytes(digits // 2).hex()

        nodes = [hex_id(56) for _ in range(-(-gpus // gpus_per_node))]
        return cls(actors=[hex_id(32) for _ in range(gpus)], nodes=nodes, gpus_per_node=gpus_per_node)

    def placement(self, actor: int) -> tuple[str, str, str]:
        return self.actors[actor], self.nodes[actor // self.gpus_per_node], f"gpu{actor % self.gpus_per_node}"


def part_record(
    cluster: Cluster, *, rows_per_part: int, batch_size: int, actors_per_part: int, rng: np.random.Generator
) -> PartStats:
    """One part's stats record as the write stage makes it: the summary `PartWriter` reads from
    the part's metadata, plus the generator's batch records (`GenerateImages._telemetry`)."""
    chosen = rng.choice(len(cluster.actors), size=min(actors_per_part, len(cluster.actors)), replace=False)
    batches = rows_per_part // batch_size
    shares = [len(s) for s in np.array_split(np.arange(batches), len(chosen))]
    telemetry, actors, nodes = PartStats(), Counter[str](), Counter[str]()
    clock = 1.8e9 + float(rng.uniform(0, 86_400))
    for index, share in zip(chosen, shares, strict=True):
        actor, node, gpu = cluster.placement(int(index))
        for _ in range(share):
            seconds = batch_size / IMAGES_PER_SECOND * float(rng.uniform(0.95, 1.1))
            clock += seconds
            telemetry += PartStats.of_batch(
                actor=actor, node=node, gpu=gpu, device="cuda", rows=batch_size,
                calls=[(batch_size, seconds, clock)],
                stage_seconds={phase: share_ * seconds for phase, share_ in PHASES.items()},
                utilization=float(rng.uniform(90, 99)), gpu_memory_peak_mb=float(rng.uniform(14_000, 16_000)),
            )  # fmt: skip
        actors[actor] += share * batch_size
        nodes[node] += share * batch_size
    rows = batches * batch_size
    record = PartStats(
        part=f"part-{rng.bytes(10).hex()}",
        rows=rows,
        bytes=int(rows * rng.uniform(1.5e6, 2.0e6)),
        generation_seconds=rows / IMAGES_PER_SECOND,
        encode_seconds=rows * float(rng.uniform(0.09, 0.11)),
        peak_memory_mb=float(rng.uniform(14_000, 16_000)),
        prompts_truncated=int(rng.integers(0, 5)),
        min_render_batch_size=batch_size,
        actors=actors,
        nodes=nodes,
    )
    record += telemetry
    record.committed_at = clock + 2.0
    record.upload_seconds = float(rng.uniform(1.0, 3.0))
    return record


def record_json(args: argparse.Namespace, *, gpus: int, count: int) -> list[str]:
    """`count` records' JSON: `--distinct` built, then cycled."""
    rng = np.random.default_rng(0)
    cluster = Cluster.of(gpus, args.gpus_per_node, rng)
    distinct = [
        part_record(
            cluster, rows_per_part=args.rows_per_part, batch_size=args.batch_size,
            actors_per_part=args.actors_per_part, rng=rng,
        ).to_json()
        for _ in range(min(count, args.distinct))
    ]  # fmt: skip
    return [distinct[i % len(distinct)] for i in range(count)]


def summary_rows(records: list[str], rows_per_part: int) -> list[pa.Table]:
    """The write stage's summary rows as the driver receives them: one one-row table per part
    (zero-copy slices of one table)."""
    table = pa.table({"rows": pa.array([rows_per_part] * len(records), pa.int64()), "record": records})
    return [table.slice(i, 1) for i in range(table.num_rows)]


def progress_bar(total: int) -> Any:
    """The runner's tqdm line (`runner._progress_bar`), drawn into /dev/null."""
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", desc="rendering", file=open(os.devnull, "w"), dynamic_ncols=True, smoothing=0.1,
        bar_format="{desc}: {n}/{total} rows |{bar}| {rate_fmt} elapsed {elapsed} ETA {remaining}",
    )  # fmt: skip


def driver_loop(batches: Iterable[Any], stats: JobStats, bar: Any) -> int:
    """The loop of `runner._execute`, over batches of summary rows; returns the rows seen."""
    seen = 0
    for batch in batches:
        assert isinstance(batch, pa.Table)
        for row in batch.to_pylist():
            stats.add_part(PartStats.from_json(row["record"]))
            bar.update(int(row["rows"]))
            seen += 1
    return seen


def per_item_us(function: Callable[[], object], count: int, repeats: int) -> float:
    """The least of `repeats` runs of `function`'s CPU time (this process's), per item, in µs: the
    machine is shared, and other processes only ever add to a run's time (as `timeit` reasons)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.process_time()
        function()
        times.append((time.process_time() - start) / count * 1e6)
    return min(times)


def time_driver(args: argparse.Namespace) -> list[list[str]]:
    """µs per record of each step of the driver's loop (at the first count), and of the whole loop."""
    table: list[list[str]] = []
    counts = [int(n) for n in args.records.split(",")]
    for count in counts:
        records = record_json(args, gpus=args.gpus, count=count)
        batches = summary_rows(records, args.rows_per_part)
        if count == counts[0]:
            size = statistics.mean(len(r) for r in records)
            table.append(["record JSON (`stats/part-*.json`)", f"{count:,}", f"{size:,.0f} bytes"])
            table += time_steps(records, batches, args.repeats)
        whole = per_item_us(lambda: _whole_loop(batches, args.rows_per_part), count, args.repeats)  # noqa: B023
        table.append(["the whole loop (`_execute`)", f"{count:,}", f"**{whole:.1f} µs**"])
    return table


def _whole_loop(batches: list[pa.Table], rows_per_part: int) -> JobStats:
    stats = JobStats()
    with contextlib.closing(progress_bar(len(batches) * rows_per_part)) as bar:
        driver_loop(batches, stats, bar)
    return stats


def time_steps(records: list[str], batches: list[pa.Table], repeats: int) -> list[list[str]]:
    count = len(records)
    parsed = [PartStats.from_json(r) for r in records]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("`batch.to_pylist()` of a one-row batch", lambda: [b.to_pylist() for b in batches]),
        ("`PartStats.from_json`", lambda: [PartStats.from_json(r) for r in records]),
        ("`JobStats.add_part`", lambda: _add_all(parsed)),
        ("tqdm `update`", lambda: _update_all(count)),
    ]
    return [[label, f"{count:,}", f"{per_item_us(step, count, repeats):.1f} µs"] for label, step in steps]


def _add_all(parsed: list[PartStats]) -> JobStats:
    stats = JobStats()
    for record in parsed:
        stats.add_part(record)
    return stats


def _update_all(count: int) -> None:
    with contextlib.closing(progress_bar(count)) as bar:
        for _ in range(count):
            bar.update(1)


def held_bytes(build: Callable[[], object]) -> tuple[int, object]:
    """Bytes of Python memory that what `build` returns still holds (tracemalloc), and it."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    value = build()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held, value


def measure_memory(args: argparse.Namespace) -> list[list[str]]:
    """What a JobStats holds after N records, per GPU count, and the slope between two N."""
    counts = [int(n) for n in args.memory_records.split(",")]
    table: list[list[str]] = []
    largest: dict[int, tuple[int, int]] = {}  # GPUs: (bytes held at the largest N, actors held)
    for gpus in sorted({args.gpus, 8}, reverse=True):
        held: list[int] = []
        for count in counts:
            records = record_json(args, gpus=gpus, count=count)

            def build(records: list[str] = records) -> JobStats:
                stats = JobStats()
                for record in records:
                    stats.add_part(PartStats.from_json(record))
                return stats

            size, stats = held_bytes(build)
            assert isinstance(stats, JobStats)
            held.append(size)
            largest[gpus] = (size, len(stats.workers))
            calls = stats.model_calls
            table.append([
                f"{gpus:,}", f"{count:,}", f"{len(stats.workers):,}", f"{calls:,}",
                f"{size / 2**20:.1f} MiB", f"{size / count:,.0f}",
            ])  # fmt: skip
            del stats, records
        if len(counts) > 1:
            slope = (held[-1] - held[0]) / (counts[-1] - counts[0])
            fixed = held[0] - slope * counts[0]
            table.append([
                f"{gpus:,}", "slope", "", f"{args.rows_per_part // args.batch_size} per record",
                f"{fixed / 2**20:.1f} MiB fixed", f"**{slope:,.0f}** per record",
            ])  # fmt: skip
    if len(largest) == 2:
        (many, many_actors), (few, few_actors) = (largest[g] for g in sorted(largest, reverse=True))
        per_actor = (many - few) / (many_actors - few_actors)
        table.append([
            "per actor", f"{counts[-1]:,}", f"{many_actors:,} - {few_actors:,}", "", "",
            f"**{per_actor:,.0f}** per actor",
        ])  # fmt: skip
    return table


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_publish_paths(count: int) -> float:
    """Bytes per image path in the set the files layout's publish builds (`_write_index`)."""
    ids = [f"part-{i // 100_000:03d}-{i % 100_000:09d}" for i in range(count)]

    def build() -> set[str]:
        return {f"images/{hashlib.sha256(i.encode()).hexdigest()[:2]}/{i}.png" for i in ids}

    size, _ = held_bytes(build)
    return size / count


STAGE_CPUS = (1.0, 0.5, 0.25, 0.125)  # one per identity stage: unequal, so that Ray Data fuses none
RAY_HEADER = [
    "rows", "rows per block", "blocks", "stages", "tasks", "wall s", "driver CPU s", "driver CPU µs per row",
    "wall µs per row", "driver CPU in Python threads (one GIL)",
]  # fmt: skip


class ThreadTimes:
    """CPU seconds of this process's threads over a window (Linux /proc), split into the threads
    that run Python (they share one GIL: the driver's loop, Ray Data's streaming executor) and
    the rest (Ray's C++ core worker threads: gRPC, object transfers)."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.after: dict[int, float] = {}
        self.python: set[int] = set()

    @staticmethod
    def now() -> dict[int, float]:
        ticks, times = os.sysconf("SC_CLK_TCK"), {}
        with contextlib.suppress(OSError):
            for task in Path("/proc/self/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    times[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return times

    def start(self) -> None:
        self.before = self.now()

    def stop_after(self, batches: Iterable[Any], *, rows: int) -> Iterator[Any]:
        """The batches, ending the window once `rows` rows have passed (while the dataset still
        runs: its executor thread ends with it)."""
        seen = 0
        for batch in batches:
            yield batch
            seen += batch.num_rows
            if not self.after and seen >= rows:
                self.after, self.python = self.now(), {t.native_id for t in threading.enumerate() if t.native_id}

    def python_share(self) -> str:
        deltas = {tid: seconds - self.before.get(tid, 0.0) for tid, seconds in self.after.items()}
        total = sum(deltas.values())
        if total <= 0:
            return "n/a"
        return f"{sum(d for tid, d in deltas.items() if tid in self.python) / total:.0%}"


def measure_ray(args: argparse.Namespace) -> tuple[list[list[str]], tuple[float, float] | None]:
    """The driver iterating summary rows out of a Ray Data dataset, per (rows, rows per block,
    stages of identity `map_batches`), and a fit of the driver's CPU time to tasks and rows."""
    from pipeline.run.session import init_ray

    init_ray(None)
    import ray.data

    def identity(batch: pa.Table) -> pa.Table:
        return batch

    table: list[list[str]] = []
    points: list[tuple[int, int, float]] = []  # tasks, rows, driver CPU seconds
    for spec in args.ray.split(","):
        rows, per_block, stages = (int(x) for x in f"{spec}:1".split(":")[:3])
        records = record_json(args, gpus=args.gpus, count=rows)
        items = [{"rows": args.rows_per_part, "record": r} for r in records]
        blocks = max(1, rows // per_block)
        dataset: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=blocks)
        for cpus in STAGE_CPUS[:stages]:
            dataset = dataset.map_batches(identity, batch_format="pyarrow", batch_size=None, num_cpus=cpus)
        stats, threads = JobStats(), ThreadTimes()
        with contextlib.closing(progress_bar(rows * args.rows_per_part)) as bar:
            iterator = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
            first = next(iterator)  # the dataset's start (workers, from_items) is left out
            assert isinstance(first, pa.Table)
            seen = driver_loop([first], stats, bar)
            wall, cpu = time.perf_counter(), time.process_time()
            threads.start()
            seen += driver_loop(threads.stop_after(iterator, rows=int(0.9 * rows) - seen), stats, bar)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert seen == rows, (seen, rows)
        measured, tasks = rows - first.num_rows, (blocks - 1) * stages
        points.append((tasks, measured, cpu))
        table.append([
            f"{rows:,}", f"{per_block:,}", f"{blocks:,}", f"{stages}", f"{tasks:,}", f"{wall:.1f}", f"{cpu:.1f}",
            f"{cpu / measured * 1e6:,.0f}", f"{wall / measured * 1e6:,.0f}", threads.python_share(),
        ])  # fmt: skip
    if len(points) < 2:
        return table, None
    matrix = np.array([[tasks, rows] for tasks, rows, _ in points], dtype=np.float64)
    (per_task, per_row), *_ = np.linalg.lstsq(matrix, np.array([cpu for *_, cpu in points]), rcond=None)
    return table, (float(per_task), float(per_row))


STAGE_NAMES = {
    "read": "read (tasks)",
    "read->StreamingRepartition": "read, cut into slices (tasks)",
    "PixelStandIn": "generate (actors)",
    "encode": "encode (tasks)",
    "write": "write (tasks)",
}


def stage_name(operator: str) -> str:
    """Our name for a Ray Data operator of the replica's stats (`MapBatches(GraphReplica.encode)`,
    `MapBatches(read)->StreamingRepartition[num_rows_per_block=256,strict=False]`)."""
    name = re.sub(r"\[[^\]]*\]", "", operator).replace("MapBatches(", "").replace(")", "")
    name = name.removeprefix("GraphReplica.")
    return STAGE_NAMES.get(name, name)


class GraphReplica:
    """The builder's graph (`run.builder._graph`) with stand-in stages and its batch sizes and CPU
    reservations: read tasks of `row_group_rows` rows cut into blocks of `slice_rows` (the
    builder's repartition), an actor pool that adds a `pixels` column of `size`² RGB per row, an
    encode stage that swaps it for `image` bytes, a write
    stage that returns one summary row per part; the slices are cut by `builder._repartition`
    itself. Byte sizes are divided by `scale` (Ray Data's
    `target_max_block_size` too), so blocks split where they would at full size; rows are not."""

    STAGE = re.compile(r"Operator \d+ (\S+): (\d+) tasks executed, (\d+) blocks produced")

    def __init__(self, args: argparse.Namespace):
        from pipeline.run.builder import ENCODE_CPUS, READ_CPUS, WRITE_CPUS

        self.cpus = (READ_CPUS, ENCODE_CPUS, WRITE_CPUS)
        self.args = args
        self.row_bytes = args.size * args.size * 3 // args.graph_scale
        self.image_bytes = int(1.707e6 * (args.size / 1024) ** 2) // args.graph_scale  # the smooth PNG's size

    def run(self, rows_per_part: int) -> tuple[list[list[str]], Counter[int]]:
        """Tasks and blocks per stage (and per `rows_per_part` rows), and the sizes of the parts."""
        import ray.data

        from pipeline.run.builder import _repartition
        from pipeline.run.session import init_ray

        args = self.args
        init_ray(None)
        context = ray.data.DataContext.get_current()
        default_block = context.target_max_block_size
        context.target_max_block_size = default_block // args.graph_scale
        rows = args.graph_slices * args.slice_rows
        groups = [min(args.row_group_rows, rows - start) for start in range(0, rows, args.row_group_rows)]
        try:
            dataset: ray.data.Dataset = ray.data.from_items(
                [{"rows": n} for n in groups], override_num_blocks=len(groups)
            )
            read, encode, write = self.cpus
            dataset = dataset.map_batches(self.read, batch_size=1, batch_format="pyarrow", num_cpus=read)
            dataset = _repartition(dataset, args.slice_rows, remote_args={"num_cpus": read})
            dataset = dataset.map_batches(
                PixelStandIn, fn_constructor_kwargs={"row_bytes": self.row_bytes}, batch_size=args.batch_size,
                batch_format="pyarrow", num_cpus=0.5,
                compute=ray.data.ActorPoolStrategy(min_size=args.graph_actors, max_size=args.graph_actors),
            )  # fmt: skip
            dataset = dataset.map_batches(
                self.encode, batch_size=args.batch_size, batch_format="pyarrow", num_cpus=encode
            )
            dataset = dataset.map_batches(self.write, batch_size=rows_per_part, batch_format="pyarrow", num_cpus=write)
            parts = Counter(int(row["rows"]) for row in dataset.iter_rows())
            report = dataset.stats()
        finally:
            context.target_max_block_size = default_block
        assert sum(size * count for size, count in parts.items()) == rows, parts
        table = [
            [f"{rows_per_part}", STAGE_NAMES.get(name, name), tasks, blocks, f"{int(tasks) / rows * rows_per_part:.2f}"]
            for name, tasks, blocks in ((stage_name(n), t, b) for n, t, b in self.STAGE.findall(report))
            if name != "FromItems"
        ]
        return table, parts

    @staticmethod
    def read(batch: pa.Table) -> pa.Table:
        return pa.table({"row": pa.array(range(batch.column("rows")[0].as_py()), pa.int64())})

    def encode(self, batch: pa.Table) -> pa.Table:
        images = pa.array([b"\1" * self.image_bytes] * batch.num_rows, pa.large_binary())
        return batch.drop_columns(["pixels"]).append_column("image", images)

    @staticmethod
    def write(batch: pa.Table) -> pa.Table:
        return pa.table({"rows": [batch.num_rows]})


class PixelStandIn:
    """The generator actor's output: a `pixels` column of `row_bytes` per row."""

    def __init__(self, *, row_bytes: int):
        self.row_bytes = row_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("pixels", pa.array([b"\0" * self.row_bytes] * batch.num_rows, pa.large_binary()))


def synthetic_pixels(size: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.stack([128 + 100 * np.sin(x / 150 + c) * np.cos(y / 210 - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    return np.clip(field + rng.normal(0.0, sigma, field.shape), 0, 255).astype(np.uint8)


def pixel_batch(size: int, sigma: float, count: int) -> pa.Table:
    """The encode stage's input: `pixels` as the generator hands them (large_binary, one buffer)."""
    images = [synthetic_pixels(size, sigma, seed) for seed in range(count)]
    data = np.concatenate([image.reshape(-1) for image in images])
    offsets = np.arange(count + 1, dtype=np.int64) * images[0].size
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    pixels = pa.LargeBinaryArray.from_buffers(pa.large_binary(), count, buffers)
    return pa.table({"pixels": pixels, "width": [size] * count, "height": [size] * count})


def measure_encoding(args: argparse.Namespace) -> tuple[list[list[str]], dict[str, pa.Table]]:
    table: list[list[str]] = []
    encoded: dict[str, pa.Table] = {}
    for label, sigma in NOISE.items():
        batch = pixel_batch(args.size, sigma, args.encode_images)
        for image_format in FORMATS:
            encode_batch(batch.slice(0, 1), image_format=image_format, quality=95)  # warm-up (imports)
            times = []
            for _ in range(args.repeats):
                start = time.process_time()
                out = encode_batch(batch, image_format=image_format, quality=95)
                times.append(time.process_time() - start)
            ms = min(times) / batch.num_rows * 1e3
            mean_bytes = statistics.mean(out.column("bytes").to_pylist())
            table.append([
                image_format, label, f"{ms:.1f}", f"{mean_bytes / 1e6:.3f}",
                f"{IMAGES_PER_SECOND * ms / 1e3:.2f}", f"{IMAGES_PER_SECOND * mean_bytes / 1e6:.1f}",
            ])  # fmt: skip
            encoded[f"{image_format} {label}"] = out
    return table, encoded


def measure_writer(args: argparse.Namespace, encoded: pa.Table) -> list[list[str]]:
    """CPU ms per row of `PartWriter.write` (a part of `--write-rows` encoded rows, local disk)."""
    n = args.write_rows
    images = [encoded.column("image")[i % encoded.num_rows].as_py() for i in range(n)]
    ids = [f"part-000-{i:09d}" for i in range(n)]
    part = pa.table({
        "id": ids, "prompt": [f"a photo of a red dog number {i}, " * 6 for i in range(n)],
        "negative_prompt": pa.nulls(n, pa.string()), "seed": list(range(n)), "width": [args.size] * n,
        "height": [args.size] * n, "steps": [4] * n, "guidance_scale": [0.0] * n,
        "image": pa.array(images, pa.large_binary()), "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "bytes": [len(b) for b in images], "generation_seconds": [0.1] * n, "encode_seconds": [0.1] * n,
        "peak_memory_mb": [15_000.0] * n, "prompt_tokens": [60] * n, "prompt_truncated": [False] * n,
        "negative_prompt_truncated": [False] * n, "render_batch_size": [args.batch_size] * n,
        "node": ["n" * 56] * n, "actor": ["a" * 32] * n,
    })  # fmt: skip
    table = []
    for layout in ("files", "webdataset"):
        times = []
        for _ in range(args.repeats):
            work = Path(tempfile.mkdtemp(prefix="sdxl-batch-part-records-"))
            try:
                writer = PartWriter(output=str(work), layout=layout, image_format="png", model=MODEL)
                start = time.process_time()
                writer.write(part)
                times.append(time.process_time() - start)
                objects = [p for p in work.rglob("*") if p.is_file()]
                written = sum(p.stat().st_size for p in objects)
            finally:
                shutil.rmtree(work)
        ms = min(times) / n * 1e3
        image_bytes = sum(len(b) for b in images)
        table.append([
            layout, f"{n:,}", f"{ms:.2f}", f"{len(objects)}", f"{written / n / 1e6:.3f}",
            f"{(written - image_bytes) / n:,.0f}",
        ])  # fmt: skip
    return table


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(row)} |" for row in rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="10000,100000", help="record counts for the driver's loop")
    parser.add_argument("--memory-records", default="10000,100000", help="record counts for JobStats' memory")
    parser.add_argument(
        "--ray", default="2000:1,20000:100,2000:1:3", help="ROWS:ROWS_PER_BLOCK[:STAGES],... for iter_batches"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the CPU measurements (the least)")
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--rows-per-part", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors-per-part", type=int, default=2, help="actors whose rows one part holds")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct records built, then cycled")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--encode-images", type=int, default=8, help="images encoded per format and content")
    parser.add_argument("--write-rows", type=int, default=64, help="rows in the part the writer writes")
    parser.add_argument(
        "--slice-rows", type=int, default=256, help="rows per read slice (read_slice_rows at 100M rows)"
    )
    parser.add_argument("--graph-slices", type=int, default=32, help="read slices through the graph replica")
    parser.add_argument("--row-group-rows", type=int, default=10_000, help="rows per read task (a row group)")
    parser.add_argument("--graph-actors", type=int, default=2, help="actors of the graph replica")
    parser.add_argument("--graph-parts", default="512,64", help="rows per part of the graph replica's runs")
    parser.add_argument("--graph-scale", type=int, default=64, help="row and block sizes divided by this")
    parser.add_argument("--out", type=Path, default=RESULTS / "part_records.md")
    args = parser.parse_args()

    started, load = time.perf_counter(), os.getloadavg()[0]
    driver = time_driver(args)
    memory = measure_memory(args)
    path_bytes = measure_publish_paths(min(200_000, 20 * int(args.memory_records.split(",")[-1])))
    encoding, encoded = measure_encoding(args)
    writing = measure_writer(args, encoded["png smooth (sigma 2)"])
    ray_rows, fit = measure_ray(args)
    replica = GraphReplica(args)
    graphs = [(int(p), *replica.run(int(p))) for p in args.graph_parts.split(",")]
    import ray

    ray.shutdown()

    calls = args.rows_per_part // args.batch_size
    lines = [
        f"Part records: synthetic part records as the write stage makes them ({args.rows_per_part} rows per part, "
        f"batch {args.batch_size}: {calls} model calls per part, {args.actors_per_part} actors per part, drawn "
        f"from {args.gpus:,} GPUs at {args.gpus_per_node} per node); {cpu_model()}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, pyarrow {pa.__version__}; {date.today()}, "
        f"{time.perf_counter() - started:.0f} s, load average {load:.1f} at the start (CPU times below are this "
        "process's own, so other work on the machine slows them less than wall times)",
        "",
        f"The driver's loop per part record (`runner._execute`), one one-row batch per part (CPU time, the "
        f"least of {args.repeats} runs):",
        "",
        *markdown(["step", "records", "per record"], driver),
        "",
        "What `JobStats` holds after N records (tracemalloc; the parsed records themselves are freed):",
        "",
        *markdown(["GPUs", "records", "actors held", "model calls (sketched)", "held", "bytes per record"], memory),
        "",
        f"End of job, files layout (`publish`): the set of every committed image path holds "
        f"**{path_bytes:.0f} bytes per image** (`images/<2 hex>/part-000-000000012.png`).",
        "",
        "Ray Data: the driver's `iter_batches` over `from_items(rows)` and STAGES identity `map_batches` (tasks; "
        "each with its own `num_cpus`, so none are fused) on the embedded local Ray, doing the loop above on every "
        "row, from the first batch on (tasks: blocks after the first × stages):",
        "",
        *markdown(RAY_HEADER, ray_rows),
    ]
    if fit is not None:
        lines += [
            "",
            f"Least-squares fit `driver CPU = tasks * t + rows * r`: **t = {fit[0] * 1e3:.2f} ms per task** (a "
            f"block through one stage), **r = {fit[1] * 1e6:.0f} µs per row**.",
        ]
    slices = args.graph_slices
    lines += [
        "",
        f"How the graph cuts {args.size}² rows into tasks and parts: the builder's graph with stand-in stages "
        f"(its batch sizes and CPU reservations; {slices} read slices of {args.slice_rows} rows, "
        f"{args.graph_actors} actors, {args.size}² RGB pixels from the actors, smooth-PNG-sized images from "
        f"the encoder; rows, blocks and Ray Data's `target_max_block_size` all divided by {args.graph_scale}):",
        "",
        *markdown(
            ["rows per part", "stage", "tasks", "blocks", "tasks per rows-per-part rows"],
            [row for _, table, _ in graphs for row in table],
        ),
        "",
    ]
    for rows_per_part, _, part_sizes in graphs:
        sizes = ", ".join(f"{n} × {size}" for size, n in sorted(part_sizes.items(), key=lambda kv: (-kv[0], kv[1])))
        lines.append(
            f"- rows per part {rows_per_part}: {sum(part_sizes.values())} parts for {slices * args.slice_rows:,} rows "
            f"({-(-slices * args.slice_rows // rows_per_part)} if every part were whole): {sizes} rows"
        )
    lines += [
        "",
        f"Image encoding (`encode_batch`: PIL and sha256), {args.size}×{args.size}, quality 95, "
        f"{args.encode_images} images each, CPU time of one core (the least of {args.repeats} runs):",
        "",
        *markdown(
            ["format", "content", "ms per image", "MB per image", "cores per GPU at 10 img/s", "MB/s per GPU"],
            encoding,
        ),
        "",
        f"The write stage (`PartWriter.write`, the smooth PNGs, local disk under {tempfile.gettempdir()}), CPU time "
        f"(the least of {args.repeats} runs):",
        "",
        *markdown(
            [
                "layout",
                "rows per part",
                "CPU ms per row",
                "objects",
                "MB written per row",
                "bytes per row beside the image",
            ],
            writing,
        ),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

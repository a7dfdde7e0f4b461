"""`sdxl-batch verify` and `report`, and the end-of-job `publish`, on outputs of millions of rows.

    .venv/bin/python benchmarks/verify_scale.py [--rows 1000000,10000000] [--rows-per-part 512]
        [--code DIR --label before] [--work DIR] [--publish-files 0] [--commands verify,report,publish]

Builds, per size, a synthetic webdataset output of `--rows` rows in parts of `--rows-per-part`
(metadata parts with the job's schema, `pipeline.core.layout.metadata_schema`; one tar per part
holding each row's image, an 8x8 PNG whose sha256 and size the metadata records; a stats record
per part with one model call per 8 rows), its manifest (files of 1,000,000 rows, 100,000-row row
groups, plus 1,000 bad rows listed in `rejects/` as `on_bad_row: skip` leaves them), then measures
in a fresh process each: `sdxl-batch verify OUTPUT --manifest MANIFEST` (which must print OK),
`sdxl-batch report OUTPUT`, and `publish` (shard list, dataset card, orphans): wall time and peak
resident memory (ru_maxrss of the child). Tars hold only the image member (a real job's also hold
`<key>.json` and `<key>.txt`), so building stays within minutes.

`--code DIR` runs another checkout's `pipeline` package (`git archive HEAD~1 pipeline | tar -x -C
DIR`), labelled `--label`, for before/after figures; `--work DIR` keeps the built outputs there
and reuses them; `--publish-files N` also builds an N-row output of the files layout (one small
file per row) and measures `publish` and `verify` on it; `--commands` picks which of the three run. Appends to
benchmarks/results/verify_scale.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = str(REPO / ".venv/bin/python")
MANIFEST_FILE_ROWS = 1_000_000
BAD_ROWS = 1000


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
PNG_SHA = hashlib.sha256(PNG).hexdigest()


def _tar_member_block(name: str) -> bytes:
    """One member's header and padded data: `tarfile` writes the same bytes, far slower."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(PNG), 0
    return info.tobuf(format=tarfile.USTAR_FORMAT) + PNG + b"\0" * (-len(PNG) % 512)


def _metadata(ids: list[str], paths: list[str], members: list[str | None]) -> pa.Table:
    from pipeline.core.layout import metadata_schema

    n = len(ids)
    columns = {
        "id": ids, "key": ids, "prompt": [f"a photo of {i}" for i in ids], "negative_prompt": [None] * n,
        "seed": range(n), "width": [8] * n, "height": [8] * n, "steps": [4] * n, "guidance_scale": [0.0] * n,
        "model": ["tiny"] * n, "scheduler": ["Euler"] * n, "weights": [""] * n, "image_path": paths,
        "tar_member": members, "sha256": [PNG_SHA] * n, "bytes": [len(PNG)] * n, "prompt_tokens": [8] * n,
        "prompt_truncated": [False] * n, "negative_prompt_truncated": [False] * n, "render_batch_size": [8] * n,
        "generation_seconds": [0.1] * n, "encode_seconds": [0.01] * n, "peak_memory_mb": [100.0] * n,
        "node": ["node-1"] * n, "actor": ["actor-1"] * n, "accelerator_type": ["CPU"] * n,
        "dtype": ["float32"] * n, "vae": ["sdxl"] * n, "attention": ["sdpa"] * n,
    }  # fmt: skip
    schema = metadata_schema(pa.schema([]))
    return pa.table({name: pa.array(columns[name], schema.field(name).type) for name in schema.names}, schema=schema)


def _stats_record(name: str, rows: int, start: float) -> str:
    calls = [[min(8, rows - k), 0.5, start + 0.5 * (k // 8 + 1)] for k in range(0, rows, 8)]
    return json.dumps({"part": name, "rows": rows, "bytes": rows * len(PNG), "generation_seconds": rows * 0.1,
                       "encode_seconds": rows * 0.01, "calls": calls, "committed_at": calls[-1][2]})  # fmt: skip


def build_output(out: Path, rows: int, per_part: int, layout: str) -> None:
    from pipeline.core.layout import image_relpath, part_name, shard_relpath

    for folder in ("metadata", "stats", "shards" if layout == "webdataset" else "images"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    t0 = time.time() - 3600
    for start in range(0, rows, per_part):
        ids = [f"row-{i:010d}" for i in range(start, min(rows, start + per_part))]
        name = part_name(ids)
        if layout == "webdataset":
            tar = shard_relpath(name)
            blocks = [_tar_member_block(f"{i}.png") for i in ids]
            (out / tar).write_bytes(b"".join(blocks) + b"\0" * 1024)
            table = _metadata(ids, [tar] * len(ids), [f"{i}.png" for i in ids])
        else:
            paths = [image_relpath(i, "png") for i in ids]
            for path in paths:
                target = out / path
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(PNG)
            table = _metadata(ids, paths, [None] * len(ids))
        (out / "stats" / f"{name}.json").write_text(_stats_record(name, len(ids), t0 + start / 100))
        pq.write_table(table, out / "metadata" / f"{name}.parquet", compression="zstd")
    job = {"started_at": "2026-01-02T03:04:05+00:00", "manifest_rows": rows + BAD_ROWS, "config": {}}
    (out / "job.json").write_text(json.dumps(job))


def build_manifest(manifest: Path, out: Path, rows: int) -> None:
    """`rows` good rows (the output's ids) and BAD_ROWS empty prompts, listed in out/rejects/."""
    from pipeline.core.layout import safe_name
    from pipeline.plan.manifest import PROBLEM_SCHEMA

    manifest.mkdir(parents=True, exist_ok=True)
    (out / "rejects").mkdir(exist_ok=True)
    files = max(1, -(-rows // MANIFEST_FILE_ROWS))
    bad_per_file = BAD_ROWS // files
    for f in range(files):
        good = range(f * MANIFEST_FILE_ROWS, min(rows, (f + 1) * MANIFEST_FILE_ROWS))
        ids = [f"row-{i:010d}" for i in good] + [f"bad-{f:04d}-{b:06d}" for b in range(bad_per_file)]
        prompts = [f"a photo of {i}" for i in good] + [""] * bad_per_file
        path = manifest / f"part-{f:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": range(len(ids))}), path, row_group_size=100_000)
        bad_rows = list(range(len(good), len(ids)))
        rejects = pa.table({
            "file": [str(path)] * bad_per_file, "row": bad_rows, "id": ids[len(good) :],
            "column": ["prompt"] * bad_per_file, "reason": ["prompt is empty"] * bad_per_file,
            "prompt": [""] * bad_per_file, "seed": [str(r) for r in bad_rows],
        }, schema=PROBLEM_SCHEMA)  # fmt: skip
        pq.write_table(rejects, out / "rejects" / f"{safe_name(path.stem)}.parquet")


def measure(argv: list[str], code: str | None) -> tuple[float, float, float, str]:
    """Run `python -m pipeline.cli ARGV` (or `python -c`): wall seconds, the process's own peak RSS
    (VmHWM, read every 0.2 s), the peak of the summed RSS of it and every process under it (an
    embedded Ray's GCS, raylet and workers), in MiB, and its stdout."""
    import threading

    import psutil

    env = dict(os.environ)
    if code:  # ahead of the editable install's finder; the current folder would come first
        env["PYTHONPATH"] = code
    start = time.perf_counter()
    process = subprocess.Popen([PYTHON, *argv], cwd=code or REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    peaks = {"own": 0.0, "tree": 0.0}

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                with open(f"/proc/{process.pid}/status") as status:
                    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
                peaks["own"] = max(peaks["own"], hwm / 1024)
                tree = [root, *root.children(recursive=True)]
                total = 0
                for member in tree:
                    with contextlib.suppress(psutil.Error):
                        total += member.memory_info().rss
                peaks["tree"] = max(peaks["tree"], total / 2**20)
            except (OSError, StopIteration, psutil.Error):
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = process.stdout.read()
    returncode = process.wait()
    wall = time.perf_counter() - start
    sampler.join()
    if returncode != 0:
        sys.exit(f"{argv} failed:\n{stdout[-3000:]}")
    return wall, max(peaks["own"], 0.0), peaks["tree"], stdout


PUBLISH = (
    "import sys; from pipeline.core.io import filesystem; from pipeline.output.publish import publish; "
    "fs, root = filesystem(sys.argv[1]); print(publish(fs, root, layout=sys.argv[2], image_format='png', "
    "captions=False))"
)


def run_size(
    work: Path, rows: int, per_part: int, layout: str, code: str | None, label: str, only: set[str], sample: float
) -> list[str]:
    out, manifest = work / f"{layout}-{rows}" / "out", work / f"{layout}-{rows}" / "manifest"
    if not (out / "job.json").exists():
        start = time.perf_counter()
        build_output(out, rows, per_part, layout)
        build_manifest(manifest, out, rows)
        print(f"built {rows:,} rows ({layout}) in {time.perf_counter() - start:.0f} s", flush=True)
    parts = len(list((out / "metadata").iterdir()))
    lines = []
    commands = {
        "verify --manifest": ["-m", "pipeline.cli", "verify", str(out), "--manifest", str(manifest)]
        + (["--sample", str(sample)] if sample < 1 else []),
        "report": ["-m", "pipeline.cli", "report", str(out)],
        "publish": ["-c", PUBLISH, str(out), layout],
    }
    for what, argv in commands.items():
        if what.split()[0] not in only:
            continue
        wall, peak, tree, stdout = measure(argv, code)
        if what.startswith("verify"):
            assert "OK: every row exactly once" in stdout and f"rejected rows:    {BAD_ROWS}" in stdout, stdout
            what += f" --sample {sample}" if sample < 1 else ""
        print(f"{label} {layout} {rows:,} {what}: {wall:.1f} s, {peak:.0f} MiB, all {tree:.0f} MiB", flush=True)
        lines.append(
            f"| {label} | {layout} | {rows:,} | {parts:,} | `{what}` | {wall:.1f} s | {peak:.0f} MiB | {tree:.0f} MiB |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--rows-per-part", type=int, default=512)
    parser.add_argument("--code", help="a folder holding another version's `pipeline` package")
    parser.add_argument("--label", default="after")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdxl-batch-verify-scale"))
    parser.add_argument("--publish-files", type=int, default=0, help="rows of a files-layout output (0: none)")
    parser.add_argument("--commands", default="verify,report,publish", help="which to measure")
    parser.add_argument("--sample", type=float, default=1.0, help="verify's --sample (1: every sha256)")
    args = parser.parse_args()
    only = set(args.commands.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    lines = []
    for rows in (int(r) for r in args.rows.split(",") if r):
        lines += run_size(args.work, rows, args.rows_per_part, "webdataset", args.code, args.label, only, args.sample)
    if args.publish_files:
        lines += run_size(
            args.work, args.publish_files, args.rows_per_part, "files", args.code, args.label, only, args.sample
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = RESULTS / "verify_scale.md"
    if not results.exists():
        header = [
            f"verify, report and publish at scale ({os.cpu_count()} CPUs, local disk); "
            f"`benchmarks/verify_scale.py`, {args.rows_per_part} rows per part",
            "",
            "| code | layout | rows | parts | command | wall time | driver peak RSS | all processes' peak RSS |",
            "|---|---|---:|---:|---|---:|---:|---:|",
        ]
        results.write_text("\n".join(header) + "\n")
    with results.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

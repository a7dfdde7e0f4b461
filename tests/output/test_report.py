"""`sdxl-batch report` without Ray: outputs written by the real PartWriter from synthetic batches
(real PNGs, the generator's telemetry), then the HTML parsed and its images decoded."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core.errors import SdxlBatchError, StorageError
from pipeline.core.io import filesystem, join, write_bytes
from pipeline.output.report import PartsDigest, stage_breakdown, throughput_series, write_report
from pipeline.output.report.figures import CallTimeline
from pipeline.output.stats import JobStats, PartStats
from pipeline.output.writer import ModelInfo, PartWriter

SECTIONS = ["Summary", "Throughput over time", "Per actor", "Stage breakdown", "Sample images"]
HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</title><b>bold & 'quoted'"]


def _png(seed: int, size: tuple[int, int] = (48, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _batch(ids: list[str], prompts: list[str], *, actor: str, started: float, big: bool = False) -> pa.Table:
    """An encoded batch as the generator and encoder hand it to the writer: one model call per
    four rows, the batch's telemetry JSON on its first row."""
    n = len(ids)
    images = [_png(i, (600, 400) if big and i == 0 else (48, 32)) for i in range(n)]
    calls = [(len(ids[k : k + 4]), 0.5, started + 0.5 * (k // 4 + 1)) for k in range(0, n, 4)]
    telemetry = PartStats.of_batch(
        actor=actor, node="node-aaaaaaaaaaaa", gpu="", device="cpu", rows=n, oom_retries=0,
        stage_seconds={"text_encode": 0.1, "denoise": 0.6, "vae_decode": 0.25, "to_host": 0.01},
        calls=calls, utilization=None, gpu_memory_peak_mb=None,
    )  # fmt: skip
    return pa.table({
        "id": ids,
        "prompt": prompts,
        "negative_prompt": pa.nulls(n, pa.string()),
        "seed": [1000 + i for i in range(n)],
        "width": [48] * n,
        "height": [32] * n,
        "steps": [4] * n,
        "guidance_scale": [0.0] * n,
        "image": pa.array(images, pa.large_binary()),
        "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "bytes": [len(b) for b in images],
        "generation_seconds": [0.25] * n,
        "encode_seconds": [0.01] * n,
        "peak_memory_mb": [512.0] * n,
        "node": ["node-aaaaaaaaaaaa"] * n,
        "actor": [actor] * n,
        "telemetry": pa.array([telemetry.to_json()] + [None] * (n - 1), pa.string()),
    })  # fmt: skip


def make_output(
    output: str,
    *,
    rows: int = 12,
    layout: str = "files",
    prompts: list[str] | None = None,
    stats_json: bool = True,
    big_image: bool = False,
) -> str:
    """An output of `rows` rows in parts of 4, from two actors, with job.json and stats.json."""
    writer = PartWriter(output=output, layout=layout, image_format="png", model=ModelInfo("tiny", "Euler"))
    ids = [f"row-{i:03d}" for i in range(rows)]
    texts = prompts or [f"a photo of a red dog number {i}" for i in range(rows)]
    stats, t0 = JobStats(), time.time() - 60
    for start in range(0, rows, 4):
        batch = _batch(ids[start : start + 4], texts[start : start + 4], actor=f"actor{start // 4 % 2}" * 4,
                       started=t0 + start / 2, big=big_image and start == 0)  # fmt: skip
        stats.add_part(writer.write(batch))
    fs, root = filesystem(output)
    config = {"generation": {"batch_size": 4}, "resources": {"actors": 2}, "write": {"layout": layout}}
    job = {"started_at": "2026-01-02T03:04:05+00:00", "manifest_rows": rows, "config": config}
    write_bytes(fs, join(root, "job.json"), json.dumps(job).encode())
    if stats_json:
        extra = {"rows_done_before": 0, "rows_rejected": 0, "model": "tiny", "scheduler": "Euler", "batch_size": 4,
                 "actors": 2, "layout": layout, "image_format": "png"}  # fmt: skip
        record = stats.to_dict(wall_seconds=9.5, manifest_rows=rows, extra=extra)
        write_bytes(fs, join(root, "stats.json"), json.dumps(record).encode())
    return output


@dataclass
class Page(HTMLParser):
    """The parts of the report page the tests look at."""

    title: str = ""
    headings: list[str] = field(default_factory=list)
    images: list[dict[str, str | None]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # every src/href-like attribute value
    tags: set[str] = field(default_factory=set)
    svgs: int = 0
    text: list[str] = field(default_factory=list)
    _in: str = ""

    def __post_init__(self) -> None:
        super().__init__()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self._in = tag
        self.svgs += tag == "svg"
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action", "srcset")]
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        self._in = ""

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "h2":
            self.headings.append(data.strip())
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def decode(src: str | None) -> Image.Image:
    assert src is not None and src.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def test_report_has_every_section_and_embeds_everything(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), big_image=True)
    assert write_report(output) == str(tmp_path / "out" / "report.html")
    html = (tmp_path / "out" / "report.html").read_text()
    page = parse(tmp_path / "out" / "report.html")
    assert page.headings == SECTIONS and "out" in page.title
    assert page.svgs == 3  # throughput, per actor, stages
    assert len(page.images) == 12
    for img in page.images:
        image = decode(img["src"])
        assert max(image.size) <= 256 and (img["width"], img["height"]) == (str(image.width), str(image.height))
    assert decode(page.images[0]["src"]).size == (256, 171)  # the 600x400 image, scaled down
    # Self-contained: nothing to fetch, no URL of any kind (SVG namespaces and metadata included).
    assert all(link.startswith(("data:", "#")) for link in page.links)
    assert "://" not in html and "<script" not in html and "<link" not in html
    text = " ".join(page.text)
    for expected in ("Rows rendered", "Batch latency p99", "Busy fraction", "Denoise (UNet)", "Upload", "actor0ac",
                     "a photo of a red dog number 7", "seed 1001", "Euler", "48×32"):  # fmt: skip
        assert expected in text, expected


def test_hostile_prompts_and_ids_are_escaped(tmp_path: Path) -> None:
    prompts = [HOSTILE[i % len(HOSTILE)] for i in range(8)]
    output = make_output(str(tmp_path / "out"), rows=8, prompts=prompts)
    page = parse(Path(write_report(output)))
    html = (tmp_path / "out" / "report.html").read_text()
    for hostile in HOSTILE:
        assert hostile not in html  # only its escaped form
        assert hostile in page.text  # and it reads back as the user wrote it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "script" not in page.tags and "b" not in page.tags
    assert all(img["src"] and img["src"].startswith("data:image/jpeg") for img in page.images)
    assert not any("onerror" in img for img in page.images)
    assert {img["alt"] for img in page.images} == set(HOSTILE)


def test_samples_are_spread_evenly_and_sorted(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), rows=40)
    page = parse(Path(write_report(output, samples=5)))
    shown = [t for t in page.text if t.startswith("row-")]
    assert shown == ["row-000", "row-010", "row-020", "row-029", "row-039"]
    assert len(page.images) == 5
    assert "5 of 40 rows" in " ".join(" ".join(page.text).split())


def test_samples_come_from_the_footers_and_the_parts_holding_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts whose ids interleave (part k holds rows k, k+10, k+20, k+30): the parts are ordered by
    their smallest id (footer statistics), each part's rows by id, and only the parts holding a
    sampled row are read, so the pick is deterministic and spread over every part."""
    from pipeline.output import streaming
    from pipeline.output.report import read

    writer = PartWriter(output=str(tmp_path / "out"), layout="files", image_format="png", model=ModelInfo("t", "E"))
    for k in range(10):
        ids = [f"row-{k + step:03d}" for step in (0, 10, 20, 30)]
        writer.write(_batch(ids, [f"prompt {i}" for i in ids], actor="actor0", started=time.time()))
    reads: list[str] = []

    def read_columns(fs: Any, path: str, columns: list[str]) -> pa.Table:
        reads.append(path)
        return streaming.read_columns(fs, path, columns)

    monkeypatch.setattr(read, "read_columns", read_columns)
    fs, root = filesystem(str(tmp_path / "out"))
    contents = read.read_output(fs, root, str(tmp_path / "out"), samples=5)
    assert [row["id"] for row in contents.samples] == ["row-000", "row-005", "row-017", "row-022", "row-039"]
    assert contents.metadata_rows == 40 and contents.metadata_parts == 10
    assert len(reads) == 5 and len(set(reads)) == 5  # the five holders, each once
    assert [r["id"] for r in read.read_output(fs, root, "out", samples=5).samples] == [
        r["id"] for r in contents.samples
    ]


def test_webdataset_layout(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), rows=10, layout="webdataset")
    assert not (tmp_path / "out" / "images").exists()
    page = parse(Path(write_report(output)))
    assert page.headings == SECTIONS
    assert len(page.images) == 10
    sizes = {decode(img["src"]).size for img in page.images}
    assert sizes == {(48, 32)}


def test_without_stats_json_the_summary_comes_from_the_parts(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), stats_json=False)
    page = parse(Path(write_report(output)))
    text = " ".join(" ".join(page.text).split())
    assert "No stats.json" in text and "rebuilt from the 3 per-part stats records" in text
    assert "Rows rendered 12" in text and "Manifest rows 12" in text and "Batch size 4" in text
    assert "Model tiny" in text and page.headings == SECTIONS


def test_an_unreadable_image_leaves_a_placeholder(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), rows=4)
    images = sorted((tmp_path / "out" / "images").rglob("*.png"))
    images[0].unlink()
    images[1].write_bytes(b"not an image")
    page = parse(Path(write_report(output)))
    assert len(page.images) == 2
    assert " ".join(page.text).count("image unreadable") == 2


def test_empty_or_missing_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SdxlBatchError, match=r"nothing to report: the output .*missing does not exist"):
        write_report(str(tmp_path / "missing"))
    (tmp_path / "empty" / "metadata").mkdir(parents=True)
    with pytest.raises(SdxlBatchError, match=r"nothing to report under .*empty: no committed part") as error:
        write_report(str(tmp_path / "empty"))
    assert "metadata/part-*.parquet" in str(error.value)
    assert not (tmp_path / "empty" / "report.html").exists()


def test_a_damaged_metadata_part_is_a_storage_error(tmp_path: Path) -> None:
    output = make_output(str(tmp_path / "out"), rows=8)
    next((tmp_path / "out" / "metadata").glob("part-*.parquet")).write_bytes(b"not parquet")
    with pytest.raises(StorageError, match=r"cannot read the output .*out: .*sdxl-batch verify"):
        write_report(output)


def test_throughput_series_counts_every_image_once() -> None:
    # Two actors: calls of 4 images, 1 s each; the second actor starts 0.5 s later.
    records = [{"calls": [[4, 1.0, 101.0], [4, 1.0, 102.0]]}, {"calls": [[4, 1.0, 101.5], [2, 1.0, 102.5]]}]
    series = throughput_series(PartsDigest.of(PartStats.from_dict(record) for record in records))
    assert series is not None
    # Finished by the end of the 1/1024 s bin each call ended in.
    assert series.finished_at.tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5], abs=1e-3)
    assert series.cumulative.tolist() == [4, 8, 12, 14]
    widths = np.diff(series.bin_edges)
    assert float((series.images_per_second * widths).sum()) == pytest.approx(14)
    assert float(series.images_per_second.max()) == pytest.approx(8.0)  # both actors at 4 images/s
    assert throughput_series(PartsDigest.of([PartStats.from_dict({"calls": []})])) is None


def _exact_done(calls: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Images done by each time in `at`, each call's images spread evenly over it: the definition."""
    images, seconds, ends = calls[:, 0], calls[:, 1], calls[:, 2]
    fraction = np.clip((at[None, :] - (ends - seconds)[:, None]) / seconds[:, None], 0.0, 1.0)
    done: np.ndarray = (fraction * images[:, None]).sum(axis=0)
    return done


def test_the_call_timeline_stays_within_its_bins_and_exact_per_bin() -> None:
    """Three simulated hours of 4 actors' calls, added a part at a time in shuffled order: the
    timeline coarsens to stay within MAX_BINS and still matches the exact rate per plot bin."""
    rng = np.random.default_rng(7)
    t0, calls = 1.8e9, []
    for _ in range(4):
        seconds = rng.uniform(0.8, 1.6, 9000)
        ends = t0 + rng.uniform(0, 5) + np.cumsum(seconds + rng.uniform(0, 0.2, 9000))
        calls.append(np.column_stack([np.full(9000, 8.0), seconds, ends]))
    every = np.concatenate(calls)
    timeline = CallTimeline()
    for part in rng.permutation(len(every)).reshape(-1, 50):
        timeline.add(every[part])
    assert len(timeline.spread) <= CallTimeline.MAX_BINS and timeline.width > 2.0**-10
    assert timeline.images == pytest.approx(float(every[:, 0].sum()))
    assert timeline.spread.sum() == pytest.approx(timeline.images) and timeline.finished.sum() == timeline.images
    records = [PartStats(calls=[tuple(c) for c in every[i : i + 50]]) for i in range(0, len(every), 50)]
    series = throughput_series(PartsDigest.of(records))
    assert series is not None and len(series.images_per_second) == 80
    exact = np.diff(_exact_done(every, series.bin_edges + timeline.start)) / np.diff(series.bin_edges)
    assert np.abs(series.images_per_second - exact).max() <= 1e-6 * exact.max() + 0.01
    assert series.cumulative[-1] == every[:, 0].sum()


def test_digests_of_groups_of_parts_merge_into_the_whole() -> None:
    """The report adds up parts in groups (a task each, `read.digest_records`): merged, the groups'
    digests are the digest of every part, whatever bins each group ended with."""
    rng = np.random.default_rng(11)
    t0, records = 1.8e9, []
    for part in range(60):  # a short group and a day-long one: their timelines have other widths
        spread = 5.0 if part < 20 else 90_000.0
        ends = t0 + np.sort(rng.uniform(0, spread, 40))
        calls = [(8.0, float(s), float(e)) for s, e in zip(rng.uniform(0.5, 1.5, 40), ends, strict=True)]
        records.append(PartStats.from_dict({"rows": 320, "generation_seconds": 40.0, "calls": calls}))
    whole = PartsDigest.of(records)
    merged = PartsDigest()
    for group in (records[:20], records[20:45], [], records[45:]):
        merged.merge(PartsDigest.of(group))
    assert merged.parts == whole.parts == 60 and merged.total.rows == whole.total.rows
    assert merged.stats.batch_latency_seconds() == whole.stats.batch_latency_seconds()
    a, b = merged.timeline, whole.timeline
    assert (a.width, a.first, a.start, a.end, a.images) == (b.width, b.first, b.start, b.end, b.images)
    assert np.allclose(a.finished, b.finished) and np.allclose(a.spread, b.spread)


def test_stage_breakdown_in_pipeline_order() -> None:
    record = {"stage_seconds": {"vae_decode": 1.0, "denoise": 3.0, "text_encode": 0.5}, "generation_seconds": 5.0,
              "encode_seconds": 0.2, "upload_seconds": 0.1}  # fmt: skip
    assert stage_breakdown(PartStats.from_dict(record)) == [
        ("Text encode", 0.5), ("Denoise (UNet)", 3.0), ("VAE decode", 1.0), ("Other generation", 0.5),
        ("Image encoding", 0.2), ("Upload", 0.1),
    ]  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "pipeline" / "output" / "report" / "templates"


def test_the_template_is_package_data() -> None:
    """The page's template is found through the package (importlib.resources, as jinja2's
    PackageLoader finds it), and pyproject.toml ships every template file in the wheel."""
    from importlib.resources import files

    from pipeline.output.report.page import TEMPLATE, environment

    assert files("pipeline.output.report").joinpath("templates", TEMPLATE).is_file()
    assert environment().autoescape is True
    assert environment().get_template(TEMPLATE).name == TEMPLATE  # found, loaded and compiled
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in globs["pipeline.output.report"] for p in TEMPLATES.parent.glob(pattern)}
    assert shipped == set(TEMPLATES.iterdir()) and shipped


@pytest.mark.integration
def test_the_wheel_holds_the_template(tmp_path: Path) -> None:
    """A non-editable wheel, built from a copy of the sources, carries the template."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "pipeline/output/report/templates/report.html.j2" in zipfile.ZipFile(wheel).namelist()


@pytest.mark.integration
def test_report_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    output = make_output(f"s3://{s3_bucket}/job/out", rows=8, layout="webdataset")
    assert write_report(output) == f"s3://{s3_bucket}/job/out/report.html"
    fs, root = filesystem(output)
    (tmp_path / "report.html").write_bytes(fs.cat_file(join(root, "report.html")))
    page = parse(tmp_path / "report.html")
    assert page.headings == SECTIONS and len(page.images) == 8
    with pytest.raises(SdxlBatchError, match="nothing to report"):
        write_report(f"s3://{s3_bucket}/job/nothing-here")

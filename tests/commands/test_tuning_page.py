"""The `tune.html` page: one plot per type and precision, every measurement in a table, escaped."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pipeline.commands.tuning.page import render_tune_page, write_tune_page

HOSTILE_TYPE = "<script>alert(1)</script>"
NOTE = "under --min-images-per-second 2 & over budget"


def trial(
    accelerator_type: str,
    dtype: str,
    batch_size: int,
    rate: float,
    *,
    status: str = "ok",
    attention: str = "sdpa",
    quality_passed: bool | None = True,
    note: str = "",
    cached: bool = False,
) -> dict[str, Any]:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    ok = status == "ok"
    return {
        "accelerator_type": accelerator_type, "status": status,
        "images_per_second": rate if ok else 0.0, "spread": 0.05 * rate if ok else 0.0,
        "windows": [rate] * 3 if ok else [], "peak_memory_mb": 6000.0 * batch_size if ok else None,
        "memory_fraction": 0.1 * batch_size if ok else None, "busy_fraction": 0.95 if ok else None,
        "bottleneck": None, "quality": 31.5 if quality_passed else (8.1 if quality_passed is False else None),
        "quality_passed": quality_passed, "cost_per_1000": 0.12 if ok else None,
        "note": note, "cached": cached,
        "load_key": f"{short}-{attention}-eager-a1", "batch_key": f"b{batch_size}",
        "settings": {"dtype": dtype, "compile": False, "attention": attention, "fuse_qkv": False,
                     "channels_last": False, "actors_per_gpu": 1, "batch_size": batch_size,
                     "vae_batch_size": None, "encode_cpus_per_gpu": None},
    }  # fmt: skip


def chosen(point: dict[str, Any], *, gpus: int, price: float | None) -> dict[str, Any]:
    return {**point, "reason": "fastest", "gpus": gpus, "price": price, "startup_seconds": 31.2}


def two_type_record() -> dict[str, Any]:
    """A10G: bfloat16 and float16 (float16 through a kernel the quality gate rejects), out of memory
    at batch 8; the hostile type: bfloat16 only, one point cached, one under the minimum rate."""
    oom = "infeasible: out of memory"
    a10g = [
        trial("A10G", "bfloat16", 1, 1.1),
        trial("A10G", "bfloat16", 2, 2.0),
        trial("A10G", "bfloat16", 4, 3.2),
        trial("A10G", "bfloat16", 8, 0, status=oom),
        trial("A10G", "float16", 2, 2.4, attention="xformers", quality_passed=False,
              note="rejected by the quality gate (psnr 8.10)"),
        trial("A10G", "float16", 4, 3.9, attention="xformers", quality_passed=False,
              note="rejected by the quality gate (psnr 8.10)"),
        trial("A10G", "float16", 8, 0, attention="xformers", status=oom, quality_passed=False),
    ]  # fmt: skip
    hostile = [
        trial(HOSTILE_TYPE, "bfloat16", 1, 1.5, cached=True),
        trial(HOSTILE_TYPE, "bfloat16", 2, 1.9, note=NOTE),
        trial(HOSTILE_TYPE, "bfloat16", 4, 0, status="failed: actor died"),
    ]
    best = {"A10G": chosen(a10g[2], gpus=16, price=1.01), HOSTILE_TYPE: chosen(hostile[0], gpus=2, price=None)}
    return {
        "created_at": "2026-12-05T10:00:00+00:00", "search": "grid", "wall_seconds": 812.4,
        "occupancy": {"trials": 0.91, "command": 0.84},
        "types": {"A10G": {"gpus": 16, "nodes": 4, "cpus_per_gpu": 8.0, "price": 1.01},
                  HOSTILE_TYPE: {"gpus": 2, "nodes": 1, "cpus_per_gpu": 4.0, "price": None}},
        "quality": {"metric": "psnr", "threshold": 20.0},
        "trials": a10g + hostile,
        "best": best,
        "fleet": {"pixels": {"dtype": "bfloat16", "attention": "sdpa", "compile": False, "fuse_qkv": False},
                  "images_per_second": 54.2, "types": best},
    }  # fmt: skip


def cpu_record(trials: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in trials if t["status"] == "ok"]
    return {
        "created_at": "2026-12-05T10:00:00+00:00", "search": "quick", "wall_seconds": 40.0,
        "occupancy": {"trials": 0.5, "command": 0.4},
        "types": {"CPU": {"gpus": 1, "nodes": 1, "cpus_per_gpu": 8.0, "price": None}},
        "quality": {"metric": "psnr", "threshold": 20.0},
        "trials": trials,
        "best": {"CPU": chosen(ok[0], gpus=1, price=None) if ok else None},
        "fleet": None,
    }  # fmt: skip


@dataclass
class Page(HTMLParser):
    """The parts of the page the tests look at."""

    tags: set[str] = field(default_factory=set)
    svgs: int = 0
    rows: list[tuple[str, str]] = field(default_factory=list)  # each table row's class and text
    links: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    _row: list[str] | None = None
    _class: str = ""

    def __post_init__(self) -> None:
        super().__init__()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.svgs += tag == "svg"
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        if tag == "tr":
            self._row, self._class = [], dict(attrs).get("class") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.rows.append((self._class, " ".join(self._row)))
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row.append(data.strip())

    @property
    def best_rows(self) -> list[str]:
        return [text for kind, text in self.rows if "best" in kind.split()]

    @property
    def prose(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_page_plots_each_type_and_precision_and_lists_every_trial() -> None:
    record = two_type_record()
    html = render_tune_page(record)
    page = parse(html)
    assert page.svgs == 3  # A10G bfloat16 and float16, the hostile type's bfloat16
    assert len(re.findall(r'<svg viewBox="', html)) == 3  # inline SVG, without a size
    for t in record["trials"]:
        assert t["load_key"] in page.prose and t["batch_key"] in page.prose
    assert page.best_rows == [
        "bf16-sdpa-eager-a1 b4 3.2 ± 0.16 24,000 (40 %) 95 % – 31.50 pass $0.120 best ok",
        "bf16-sdpa-eager-a1 b1 1.5 ± 0.075 6,000 (10 %) 95 % – 31.50 pass $0.120 best ok cached",
    ]
    infeasible = [text for kind, text in page.rows if kind == "infeasible"]
    assert infeasible == [
        f"{key} b8 – – – – – – infeasible: out of memory" for key in ("bf16-sdpa-eager-a1", "fp16-xformers-eager-a1")
    ]
    assert sum(kind == "rejected" for kind, _ in page.rows) == 2
    prose = page.prose
    for expected in ("infeasible: out of memory", "failed: actor died", "rejected by the quality gate (psnr 8.10)",
                     "dtype bfloat16 · attention sdpa · compile off · fuse_qkv off", "54.2 images/s", "13 min 32 s",
                     "trials 91 %", "whole command 84 %", "$1.01", "psnr, threshold 20.0"):  # fmt: skip
        assert expected in prose, expected
    assert "No measurement ran" not in prose and "passed on every type" not in prose


def test_plots_draw_lines_crosses_and_the_best_point_in_plain_text() -> None:
    html = render_tune_page(two_type_record())
    plots = re.findall(r"<svg.*?</svg>", html, flags=re.DOTALL)
    a10g_bf16, a10g_fp16, hostile = plots
    for label in ("bf16-sdpa-eager-a1", "infeasible", "best", "batch size", "images/s per GPU"):
        assert label in a10g_bf16, label
    assert "fp16-xformers-eager-a1 (rejected: quality)" in a10g_fp16 and "best" not in a10g_fp16
    assert "failed" in hostile and "_script_alert_1___script bfloat16" in hostile  # a plain, shortened title
    assert all(tick in a10g_bf16 for tick in (">1<", ">2<", ">4<", ">8<"))  # the batch sizes label the axis


def test_user_text_is_escaped() -> None:
    html = render_tune_page(two_type_record())
    page = parse(html)
    assert HOSTILE_TYPE not in html and "script" not in page.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert HOSTILE_TYPE in page.prose  # it reads back as the cluster named it
    assert "over budget" in html and NOTE not in html and NOTE in page.prose  # `&` escaped as &amp;
    # Self-contained: nothing to fetch.
    assert all(link.startswith("#") for link in page.links) and "://" not in html and "<link" not in html


def test_write_tune_page_writes_beside_the_record(tmp_path: Path) -> None:
    path = tmp_path / "tune.html"
    assert write_tune_page(two_type_record(), path) == path
    assert path.read_text(encoding="utf-8") == render_tune_page(two_type_record())


def test_cpu_record_without_fleet_says_so() -> None:
    trials = [trial("CPU", "float32", 1, 0.02), trial("CPU", "float32", 2, 0.03)]
    page = parse(render_tune_page(cpu_record(trials)))
    assert page.svgs == 1
    assert "no precision/attention/compile setting passed on every type" in page.prose
    assert len(page.best_rows) == 1 and page.best_rows[0].startswith("fp32-sdpa-eager-a1 b1")


def test_record_without_a_measurement_still_renders() -> None:
    oom = "infeasible: 93% of the GPU's memory > --max-memory-fraction 90%"
    trials = [trial("CPU", "float32", 4, 0, status=oom), trial("CPU", "float32", 8, 0, status="failed: $HOME & co")]
    page = parse(render_tune_page(cpu_record(trials)))
    assert page.svgs == 1 and not page.best_rows
    assert "No measurement ran: every one of the 2 trials was infeasible or failed" in page.prose
    assert "No eligible point on this type" in page.prose and oom in page.prose
    empty = parse(render_tune_page({"types": {}, "trials": [], "best": {}, "fleet": None}))
    assert empty.svgs == 0 and "No measurement ran: the record holds no trials" in empty.prose

"""`compare` run again over its own output: the table keeps the figures that were measured."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.compare import comparison_table, with_rendered_figures
from pipeline.core.io import filesystem
from pipeline.core.layout import STATS_FILE, write_json
from pipeline.output.stats import JobStats
from pipeline.run.runner import JobResult

MEASURED = {"rows": 24, "seconds_per_image": 0.0558, "images_per_second": 3.2596, "peak_memory_mb": 655.1}
NOTHING = {"rows": 0, "seconds_per_image": 0.0, "images_per_second": 0.0, "peak_memory_mb": 0.0}


def _result(output: Path, stats: dict[str, float]) -> JobResult:
    return JobResult(str(output), int(stats["rows"]), 1.0, stats["images_per_second"], dict(stats), JobStats())


def test_a_preset_with_nothing_left_keeps_the_figures_that_rendered_it(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path / "lightning-4step"))
    fs.makedirs(root, exist_ok=True)
    write_json(fs, f"{root}/{STATS_FILE}", MEASURED)
    rerun = with_rendered_figures(fs, root, _result(tmp_path, NOTHING))
    assert rerun.stats == MEASURED
    table = comparison_table(["lightning-4step"], {"lightning-4step": rerun})
    assert "| lightning-4step | 24 | 0.056 | 3.26 | 655 |" in table
    rendered = _result(tmp_path, {**MEASURED, "rows": 8})
    assert with_rendered_figures(fs, root, rendered) is rendered  # a run that rendered: its own figures
    empty, empty_root = filesystem(str(tmp_path / "never-rendered"))
    assert with_rendered_figures(empty, empty_root, _result(tmp_path, NOTHING)).stats == NOTHING

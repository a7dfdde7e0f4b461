"""Every run's figures kept under stats/runs/, and the whole output's summed from them."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import filesystem
from pipeline.output.orphans import find_orphans
from pipeline.output.runs import output_figures, write_run


def test_the_output_figures_sum_the_runs_that_rendered(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path / "out"))
    first = {"started_at": "2026-12-05T01:00:00", "finished_at": "2026-12-05T01:10:00", "rows": 100,
             "wall_seconds": 50.0, "stage_seconds": {"generate": 40.0}, "dtype": "bfloat16"}  # fmt: skip
    second = {"started_at": "2026-12-06T01:00:00", "finished_at": "2026-12-06T01:05:00", "rows": 50,
              "wall_seconds": 25.0, "stage_seconds": {"generate": 20.0}, "rows_done_before": 100}  # fmt: skip
    write_run(fs, root, second)
    write_run(fs, root, first)
    (tmp_path / "out" / "stats" / "runs" / "damaged.json").write_text("{not json")
    figures = output_figures(fs, root)
    assert figures["runs"] == 2 and figures["images"] == 150 and figures["wall_seconds"] == 75.0
    assert figures["generation_seconds"] == 60.0 and figures["images_per_second"] == 2.0
    assert [run["started_at"] for run in figures["by_run"]] == [first["started_at"], second["started_at"]]
    assert figures["by_run"][1]["rows_done_before"] == 100


def test_run_records_are_not_orphans(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path / "out"))
    write_run(fs, root, {"rows": 1, "finished_at": "2026-12-05T01:00:00"})
    assert find_orphans(fs, root, parts=set(), tars=set()).count == 0


def test_no_runs_no_figures(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path / "out"))
    assert output_figures(fs, root) == {
        "runs": 0, "images": 0, "wall_seconds": 0.0, "generation_seconds": 0.0, "images_per_second": 0.0,
        "by_run": [],
    }  # fmt: skip

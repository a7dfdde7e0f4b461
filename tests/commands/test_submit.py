"""What `sdxl-batch submit` ships as the job's working directory."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.submit import SUBMITTED_CONFIG, working_dir
from tests.helpers import write_config


def test_working_dir_ships_the_package_the_entrypoint_and_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"))
    with working_dir(config) as folder:
        assert (folder / "pipeline" / "__init__.py").is_file()
        assert (folder / "pipeline" / "output" / "report" / "templates" / "report.html.j2").is_file()
        assert (folder / "jobs" / "generate.py").is_file() and (folder / "configs" / "demo.yaml").is_file()
        assert (folder / SUBMITTED_CONFIG).is_file()
        assert not list(folder.rglob("__pycache__"))

"""The parser the command groups compose, and what starting the CLI costs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from tests.helpers import REPO

HEAVY = ("torch", "ray", "diffusers", "pyarrow.dataset")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["jobs", "logs", "--help"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    """Every parser is built for `--help`; the handlers import the pipeline only when they run, so
    `sdxl-batch --help` answers at once instead of after torch, Ray and diffusers have loaded."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.cli", *argv],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: sdxl-batch")
    # -X importtime writes one line per module imported: "import time: self | cumulative | name".
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in lines}
    assert "pipeline.cli" in imported
    assert not [name for name in imported if any(name == h or name.startswith(f"{h}.") for h in HEAVY)]


@pytest.mark.parametrize(
    ("argv", "handler"),
    [
        (["run", "c.yaml"], "cmd_run"), (["validate", "c.yaml"], "cmd_validate"), (["verify", "out"], "cmd_verify"),
        (["models"], "cmd_models"), (["compare", "--presets", "tiny"], "cmd_compare"),
        (["submit", "c.yaml", "--address", "a"], "cmd_submit"), (["jobs", "list", "--address", "a"], "cmd_jobs_list"),
        (["jobs", "status", "j", "--address", "a"], "cmd_jobs_status"),
        (["jobs", "logs", "j", "--address", "a"], "cmd_jobs_logs"),
        (["jobs", "stop", "j", "--address", "a"], "cmd_jobs_stop"),
        (["report", "out"], "cmd_report"), (["estimate", "c.yaml"], "cmd_estimate"), (["tune", "c.yaml"], "cmd_tune"),
    ],
)  # fmt: skip
def test_every_command_names_its_handler(argv: list[str], handler: str) -> None:
    """Each command group registers its parsers with their handlers; `main` calls the one parsed."""
    assert build_parser().parse_args(argv).handler.__name__ == handler


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "half"])
def test_verify_sample_must_be_a_fraction(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["verify", "out", "--sample", value])
    assert exit_info.value.code == 2
    assert f"{value!r} is not a fraction in (0, 1]" in capsys.readouterr().err


def test_verify_sample_parses() -> None:
    assert build_parser().parse_args(["verify", "out", "--sample", "0.01"]).sample == 0.01
    assert build_parser().parse_args(["verify", "out"]).sample == 1.0


def test_models_fits_in_100_columns(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main
    from pipeline.models.presets import PRESETS

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    for preset in PRESETS.values():
        assert f"\n{preset.name} " in text and preset.licence in text
    assert "Euler (sample, trailing)" in text and "SDXL base + ByteDance/SDXL-Lightning/" in text
    assert "! Stability AI Non-Commercial Research Community License" in text


def test_a_job_needs_no_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sdxl-batch validate|run --manifest M --output O [--preset P]`: the defaults, without a file."""
    from pipeline.cli import main
    from tests.helpers import prompt_rows, write_manifest

    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(3))
    code = main(["validate", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--preset", "tiny"])
    out = capsys.readouterr().out
    assert code == 0 and "to render  3 rows" in out and "model      tiny" in out and "OK: the job can start" in out
    assert main(["validate"]) == 2
    assert "manifest: required but missing" in capsys.readouterr().err

"""Bad input through the real CLI: `validate`, `run` with on_bad_row fail/skip, object-store
problems. Nothing may reach a GPU (or start Ray) before the input is known to be good."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import prompt_rows, read_metadata, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration


def _rows_with_problems() -> list[dict[str, object]]:
    rows = prompt_rows(12)
    for row in rows:
        row["width"] = None
    rows[2]["prompt"] = "   "
    rows[5]["seed"] = -1
    rows[7]["width"] = 100  # not a multiple of 8
    rows[9]["id"] = rows[1]["id"]  # duplicate: the first occurrence is kept
    return rows


def _config(tmp_path: Path, model_cache: Path, manifest: Path, **extra: object) -> Path:
    return write_config(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model={"preset": "tiny", "cache_dir": str(model_cache)},
        generation={"batch_size": 4, "width": 64, "height": 64},
        write={"rows_per_part": 4},
        **extra,
    )


def test_validate_reports_and_run_refuses_bad_rows_before_ray(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", _rows_with_problems())
    config = _config(tmp_path, model_cache, manifest)

    checked = run_cli("validate", str(config))
    assert checked.returncode == 1, checked.stderr
    assert "12 rows" in checked.stdout and "bad rows   4" in checked.stdout and "NOT READY" in checked.stdout
    for expected in (
        "row 2, column 'prompt' (id 'row-0002'): prompt is empty",
        "row 5, column 'seed' (id 'row-0005'): seed is out of range",
        "row 7, column 'width' (id 'row-0007'): width must be a multiple of 8 (got 100)",
        "row 9, column 'id' (id 'row-0001'): duplicate id (first at file",
    ):
        assert expected in checked.stdout, checked.stdout

    refused = run_cli("run", str(config), "--no-progress")
    assert refused.returncode == 1  # as validate's NOT READY: bad rows, where structural problems exit 2
    assert "4 bad row(s) in the manifest" in refused.stderr and "on_bad_row: skip" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written or Ray started


def test_skip_renders_the_rest_lists_rejects_and_resumes(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", _rows_with_problems())
    config = _config(tmp_path, model_cache, manifest, on_bad_row="skip")
    output = tmp_path / "out"

    checked = run_cli("validate", str(config))
    assert checked.returncode == 0 and "to render  8 rows" in checked.stdout and "OK" in checked.stdout

    result = run_cli("run", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Skipped 4 bad rows" in result.stdout and "Rendered 8 images" in result.stdout
    assert result.stderr.count("skipping 4 bad row(s)") == 1

    rejects = pq.read_table(output / "rejects" / "m.parquet").to_pylist()
    assert [(r["row"], r["column"]) for r in rejects] == [(2, "prompt"), (5, "seed"), (7, "width"), (9, "id")]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["rows"] == 8 and stats["rows_rejected"] == 4 and stats["rejects_files"] == 1
    assert stats["rejected_by_column"] == {"prompt": 1, "seed": 1, "width": 1, "duplicate id": 1}
    ids = read_metadata(str(output)).column("id").to_pylist()
    assert sorted(ids) == [f"row-{i:04d}" for i in (0, 1, 3, 4, 6, 8, 10, 11)]

    verified = run_cli("verify", str(output), "--manifest", str(manifest))
    assert verified.returncode == 0, verified.stdout
    assert "rejected rows:    4" in verified.stdout

    again = run_cli("run", str(config), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "Resumed: 8 of 12" in again.stdout and "Rendered 0 images" in again.stdout
    assert pq.read_table(output / "rejects" / "m.parquet").to_pylist() == rejects


def test_structural_problems_exit_2_with_what_where_and_what_to_do(tmp_path: Path) -> None:
    def validate(manifest: Path | str, **extra: object) -> tuple[int, str]:
        config = write_config(tmp_path / "job.yaml", manifest=str(manifest), output=str(tmp_path / "o"), **extra)
        result = run_cli("validate", str(config))
        assert "Traceback" not in result.stderr
        return result.returncode, result.stderr

    good = write_manifest(tmp_path / "good.parquet", prompt_rows(2))
    code, err = validate(tmp_path / "absent.parquet")
    assert code == 2 and "manifest not found" in err and "absent.parquet" in err
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    code, err = validate(tmp_path / "corrupt.parquet")
    assert code == 2 and "corrupt.parquet" in err and "not a readable Parquet file" in err
    no_seed = write_manifest(tmp_path / "noseed.parquet", [{"prompt": "p"}])
    code, err = validate(no_seed)
    assert code == 0, err  # seeds are optional: each row's derives from its id
    no_prompt = write_manifest(tmp_path / "noprompt.parquet", [{"seed": 1}])
    code, err = validate(no_prompt)
    assert code == 2 and "noprompt.parquet" in err and "column 'prompt'" in err and "required column is missing" in err
    text_seed = write_manifest(tmp_path / "textseed.parquet", [{"prompt": "p", "seed": "7"}])
    code, err = validate(text_seed)
    assert code == 2 and "column 'seed'" in err and "expected integer values, found string" in err
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "seed": pa.array([], pa.int64())}), empty)
    code, err = validate(empty)
    assert code == 2 and "has no rows" in err
    code, err = validate(good, generation={"batchsize": 4})
    assert code == 2 and "generation.batchsize: unknown key" in err
    code, err = validate(good, model={"preset": "lightning-3step"})
    assert code == 2 and "unknown model preset 'lightning-3step'" in err
    # Two files whose pass-through column no type holds unchanged (float64 cannot hold every int64).
    mixed = tmp_path / "mixed"
    write_manifest(mixed / "a.parquet", [{"prompt": "p", "seed": 1, "score": 2**40}])
    write_manifest(mixed / "b.parquet", [{"prompt": "p", "seed": 2, "score": 0.1}])
    code, err = validate(mixed)
    assert code == 2 and "a.parquet" in err and "b.parquet" in err and "'score'" in err
    assert "is double here and int64 in" in err and "one schema" in err


def test_object_store_problems_are_clear(tmp_path: Path, s3_bucket: str, s3_env: dict[str, str]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(prompt_rows(3)), buffer)
    fs.pipe(f"{s3_bucket}/m/a.parquet", buffer.getvalue())
    config = write_config(tmp_path / "job.yaml", manifest=f"s3://{s3_bucket}/m/", output=f"s3://{s3_bucket}/out")

    assert run_cli("validate", str(config), env=s3_env).returncode == 0

    missing = run_cli("validate", str(config), "--manifest", "s3://no-such-bucket-here/m/", env=s3_env)
    assert missing.returncode == 2 and "s3://no-such-bucket-here/m/" in missing.stderr
    assert "Traceback" not in missing.stderr

    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_credentials.update(
        AWS_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"],
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    denied = run_cli("validate", str(config), env={**no_credentials, "AWS_ACCESS_KEY_ID": ""})
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    assert "credentials" in denied.stderr.lower(), denied.stderr


def test_a_model_that_cannot_load_stops_the_job_with_its_own_message(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(3))
    config = _config(tmp_path, model_cache, manifest)
    result = run_cli("run", str(config), "--no-progress", "--set", f"model.path={tmp_path / 'no-such-model'}")
    assert result.returncode == 2
    assert "error: " in result.stderr and "no-such-model' is neither a local diffusers folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_actors_that_would_take_every_cpu_stop_the_job_instead_of_hanging(tmp_path: Path, model_cache: Path) -> None:
    """As many 1-CPU actors as the machine has CPUs left the read, encode and write stages no CPU:
    Ray Data waited for ever without a word. Set by the user, that is now an error naming the fix."""
    cpus = os.cpu_count() or 1
    config = _config(tmp_path, model_cache, write_manifest(tmp_path / "m.parquet", prompt_rows(4)))
    result = run_cli("run", str(config), "--no-progress", "--set", f"resources.actors={cpus}",
                     "--set", "resources.cpus_per_actor=1", timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{cpus} generator actor(s) x 1 CPU (resources.cpus_per_actor)" in result.stderr
    assert "could never start" in result.stderr and "resources.cpus_per_actor to" in result.stderr
    assert not (tmp_path / "out" / "metadata").exists() or not list((tmp_path / "out" / "metadata").iterdir())

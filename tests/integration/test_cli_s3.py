"""`sdxl-batch run` against a real S3 endpoint (moto's server over HTTP on loopback): manifest
and model read from the bucket, webdataset shards and metadata written to it."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.helpers import prompt_rows, read_metadata, run_cli, write_config

pytestmark = pytest.mark.integration


def test_run_from_and_to_s3(tmp_path: Path, tiny_dir: Path, s3_bucket: str, s3_env: dict[str, str]) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    for name, rows in (
        ("a.parquet", prompt_rows(4, with_ids=False)),
        ("b.parquet", prompt_rows(3, start=4, with_ids=False)),
    ):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        fs.pipe(f"{s3_bucket}/manifests/{name}", buffer.getvalue())
    fs.put(str(tiny_dir) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    output = f"s3://{s3_bucket}/renders/run-1"
    config = write_config(
        tmp_path / "job.yaml",
        manifest=f"s3://{s3_bucket}/manifests/",
        output=output,
        model={"preset": "tiny", "path": f"s3://{s3_bucket}/models/tiny", "cache_dir": str(tmp_path / "cache")},
        generation={"batch_size": 2, "image_format": "jpeg"},
        write={"layout": "webdataset", "rows_per_part": 4},
    )
    result = run_cli("run", str(config), env=s3_env)
    assert result.returncode == 0, result.stderr
    assert f"{output}/stats.json" in result.stdout

    # The model was copied once into the local cache, with its completion marker.
    copies = list((tmp_path / "cache" / "models").iterdir())
    assert len(copies) == 1 and (copies[0] / ".sdxl-batch-complete").exists()

    table = read_metadata(f"{s3_bucket}/renders/run-1", filesystem=fs)
    ids = sorted(table.column("id").to_pylist())
    assert ids == [f"a-{i:09d}" for i in range(4)] + [f"b-{i:09d}" for i in range(3)]
    for row in table.to_pylist():
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{s3_bucket}/renders/run-1/{row['image_path']}"))) as tar:
            member = tar.extractfile(row["tar_member"])
            assert member is not None
            assert hashlib.sha256(member.read()).hexdigest() == row["sha256"]
        assert row["tar_member"].endswith(".jpg")
    assert fs.exists(f"{s3_bucket}/renders/run-1/stats.json")
    for secret in (s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["AWS_ACCESS_KEY_ID"]):
        assert secret not in result.stdout + result.stderr
        assert secret not in fs.cat(f"{s3_bucket}/renders/run-1/job.json").decode()

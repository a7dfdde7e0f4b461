"""Validation before any GPU work: every row checked, bad rows reported or skipped, a job summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import build_config
from pipeline.core.errors import ConfigError, ManifestError, ModelError
from pipeline.plan.job import plan_job, raise_for_bad_rows, write_rejects
from pipeline.plan.manifest import Fragment, read_fragment, rules_for
from pipeline.plan.rows import iter_pending
from tests.helpers import pending_ids, pending_mask, plan_manifest, prompt_rows, write_manifest


def _job(tmp_path: Path, rows: list[dict[str, Any]], *, schema: pa.Schema | None = None, **config: Any) -> Any:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    data = {"manifest": str(path), "output": str(tmp_path / "out"), "model": {"preset": "lightning-4step"}, **config}
    return plan_job(build_config(data))


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ({"prompt": None}, "prompt", "prompt is missing"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": "  \t "}, "prompt", "prompt is empty"),
        ({"seed": None}, "seed", "seed is missing"),
        ({"seed": -5}, "seed", "seed is out of range"),
        ({"width": 1004}, "width", "multiple of 8"),
        ({"height": 4096}, "height", "renders heights from 64 to 2048 px (got 4096)"),
        ({"width": 32}, "width", "renders widths from 64 to 2048 px (got 32)"),
        ({"steps": 8}, "steps", "takes 4 steps: the checkpoint was distilled for exactly this step count"),
        ({"guidance_scale": 5.0}, "guidance_scale", "takes guidance 0 to 1"),
        ({"id": ""}, "id", "id is empty"),
    ],
)
def test_each_kind_of_bad_row_is_named_with_file_row_and_column(
    tmp_path: Path, row: dict[str, Any], column: str, reason: str
) -> None:
    good = {"id": "a", "prompt": "fine", "seed": 1, "width": 1024, "height": 1024, "steps": 4, "guidance_scale": 0.0}
    rows = [good, {**good, "id": "b", **row}]
    job = _job(tmp_path, rows)
    assert job.manifest.problem_count == 1 and (~pending_mask(job.manifest)).tolist() == [False, True]
    with pytest.raises(ManifestError) as info:
        raise_for_bad_rows(job)
    message = str(info.value)
    assert f"m.parquet, row 1, column '{column}'" in message and reason in message
    assert "on_bad_row: skip" in message  # says what to do


def test_seeds_stored_as_floats_must_be_integral_and_in_range(tmp_path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("seed", pa.float64())])
    rows = [{"prompt": "p", "seed": s} for s in (3.0, 2.5, float("nan"), 2.0**64, -1.0, float("inf"))]
    job = _job(tmp_path, rows, schema=schema, on_bad_row="skip")
    assert (~pending_mask(job.manifest)).tolist() == [False, True, True, True, True, True]
    reasons = job.manifest.problems.column("reason").to_pylist()
    assert "not an integer" in reasons[0] and "out of range" in reasons[2]
    (table,) = iter_pending(job.manifest, None, rules_for(job.preset))
    assert table.column("seed").to_pylist() == [3] and table.schema.field("seed").type == pa.int64()


def test_fail_mode_reports_the_first_rows_and_the_total(tmp_path: Path) -> None:
    rows = [{"prompt": "p" if i % 3 else "", "seed": i} for i in range(90)]
    job = _job(tmp_path, rows)
    assert job.manifest.problem_count == 30 and job.manifest.problems.num_rows == 20  # details of the first only
    with pytest.raises(ManifestError) as info:
        raise_for_bad_rows(job)
    message = str(info.value)
    assert message.startswith("30 bad row(s)") and "row 0," in message and "row 27," in message
    assert "row 30," not in message and "and 20 more" in message


def test_skip_mode_keeps_every_problem_and_writes_rejects(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": "p" if i % 3 else "", "seed": i} for i in range(90)]
    rows[5]["id"] = "r4"  # a duplicate: the later occurrence is rejected
    job = _job(tmp_path, rows, on_bad_row="skip")
    raise_for_bad_rows(job)  # does not raise
    assert job.manifest.problem_count == 31 and job.pending_rows == 59
    assert dict(job.manifest.problem_columns) == {"prompt": 30, "duplicate id": 1}
    written = write_rejects(job)
    assert len(written) == 1 and written[0].endswith("rejects/m.parquet")
    rejects = pq.read_table(tmp_path / "out" / "rejects" / "m.parquet").to_pylist()
    assert [r["row"] for r in rejects] == sorted([*range(0, 90, 3), 5])
    duplicate = next(r for r in rejects if r["row"] == 5)
    assert duplicate["id"] == "r4" and "duplicate id (first at file" in duplicate["reason"]
    assert rejects[0] == {
        "file": str(tmp_path / "m.parquet"),
        "row": 0,
        "id": "r0",
        "column": "prompt",
        "reason": "prompt is empty",
        "prompt": "",
        "seed": "0",
    }
    # A fixed manifest leaves no stale rejects behind.
    fixed = _job(tmp_path, [{"id": f"r{i}", "prompt": "p", "seed": i} for i in range(90)], on_bad_row="skip")
    assert write_rejects(fixed) == [] and not list((tmp_path / "out" / "rejects").iterdir())


def test_read_tasks_skip_rejected_and_done_rows_by_position(tmp_path: Path) -> None:
    from pipeline.core.layout import metadata_schema
    from pipeline.plan.ledger import settings_fingerprint
    from pipeline.plan.schema import conform

    rows = prompt_rows(40, with_ids=False)  # derived ids depend on positions: dropping rows must not shift them
    rows[3]["prompt"] = ""
    rows[17]["seed"] = -1
    write_manifest(tmp_path / "m.parquet", rows, row_group_size=16)
    data = {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "o"), "on_bad_row": "skip"}
    config = build_config({**data, "model": {"preset": "tiny"}})
    # As if a previous run had committed rows 0, 20 and 21.
    (tmp_path / "o" / "metadata").mkdir(parents=True)
    done = pa.table({"id": [f"m-{i:09d}" for i in (0, 20, 21)]})
    schema = metadata_schema(pa.schema([("note", pa.string())]))  # prompt_rows have a `note`
    pq.write_table(conform(done, schema), tmp_path / "o" / "metadata" / "part-x.parquet")
    (tmp_path / "o" / "job.json").write_text(json.dumps({"fingerprint": settings_fingerprint(config)}))
    job = plan_job(config)
    assert job.done_rows == 3 and job.pending_rows == 35
    assert sum(t["pending"] for t in job.manifest.read_tasks()) == 35
    expected = [f"m-{n:09d}" for n in range(40) if n not in (0, 3, 17, 20, 21)]
    assert pending_ids(job.manifest) == expected and expected[0] == "m-000000001"


def test_a_row_changed_after_planning_stops_the_read_stage(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m.parquet", prompt_rows(4))
    plan = plan_manifest(str(tmp_path / "m.parquet"))
    task = plan.read_tasks()[0]
    rows = prompt_rows(4)
    rows[2]["seed"] = -7
    write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(ManifestError, match=r"row 2, column 'seed'.*changed after the job was planned"):
        read_fragment(Fragment(**{name: task[name] for name in Fragment.__dataclass_fields__}))


def test_job_level_settings_are_checked_against_the_preset(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "seed": 1}]
    with pytest.raises(ConfigError, match="width 1004 is not a multiple of 8"):
        _job(tmp_path, rows, generation={"width": 1004})
    with pytest.raises(ConfigError, match="renders heights from 64 to 2048 px, not 4096"):
        _job(tmp_path, rows, generation={"height": 4096})
    with pytest.raises(ConfigError, match="takes 4 steps"):
        _job(tmp_path, rows, generation={"steps": 30})
    with pytest.raises(ModelError, match="unknown model preset 'lightning-5step'"):
        _job(tmp_path, rows, model={"preset": "lightning-5step"})
    with pytest.raises(ConfigError, match="unknown key"):
        _job(tmp_path, rows, on_bad_rows="skip")


def test_summary_says_what_the_job_will_do(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "seed": i, "width": 768 if i < 3 else None, "height": None, "n": i} for i in range(10)]
    rows.append({"prompt": "", "seed": 10, "width": None, "height": None, "n": 10})
    job = _job(tmp_path, rows, on_bad_row="skip", generation={"batch_size": 4})
    assert job.render_groups() == [((1024, 1024, 4, 0.0), 7), ((768, 1024, 4, 0.0), 3)]
    assert job.model_calls() == math.ceil(7 / 4) + 1
    text = "\n".join(job.summary_lines())
    for expected in (
        "1 file, 11 rows",
        "bad rows   1 (1 prompt); on_bad_row: skip",
        "to render  10 rows",
        "1024x1024, 4 steps, guidance 0: 7 rows",
        "768x1024, 4 steps, guidance 0: 3 rows",
        "3 model calls (batch size 4)",
        "estimate   unknown",
        "metadata   the fixed columns, then the manifest's: n (int64)",
    ):
        assert expected in text, text


def test_estimate_uses_a_previous_measurement_with_the_same_settings(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "seed": i} for i in range(100)]
    job = _job(tmp_path, rows, resources={"actors": 2})
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"fingerprint": job.fingerprint}))
    (out / "stats.json").write_text(json.dumps({"rows": 10, "seconds_per_image": 0.5}))
    job = _job(tmp_path, rows, resources={"actors": 2})
    seconds, source = job.estimate()
    assert seconds == pytest.approx(50.0) and "0.500 s/image" in source
    assert (
        "estimate   25 s of rendering on 2 actor(s) (0.500 s/image measured by the previous run into this output; "
        "50 s of generator time), plus start-up (Ray, the model's load: not measured)" in "\n".join(job.summary_lines())
    )
    # With the previous run's start-up measured: the run's wall time, start-up included.
    breakdown = {"planning": 0.5, "starting_ray": 3.0, "starting_generators": 8.0, "rendering": 4.0, "finishing": 0.5}
    (out / "stats.json").write_text(
        json.dumps({"rows": 10, "seconds_per_image": 0.5, "wall_breakdown_seconds": breakdown})
    )
    job = _job(tmp_path, rows, resources={"actors": 2})
    assert job.startup_seconds() == 12.0
    assert (
        "estimate   about 37 s: start-up and finishing 12 s (as the previous run's), rendering 25 s on 2 actor(s)"
        in "\n".join(job.summary_lines())
    )
    (out / "job.json").write_text(json.dumps({"fingerprint": {"digest": "other"}}))
    assert _job(tmp_path, rows).estimate() is None  # other settings: no estimate


def test_planning_memory_holds_no_row(tmp_path: Path) -> None:
    """What the plan keeps is per file and per row group: the pending rows are a bit per row in a
    packed mask that only the read stage opens."""
    rows = [{"prompt": "x" * 2000, "seed": i} for i in range(20_000)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5_000)
    job = plan_job(build_config({"manifest": str(path), "output": str(tmp_path / "out"), "model": {"preset": "tiny"}}))
    assert job.pending_rows == 20_000 and job.manifest.pending_row_groups == {0: [5_000] * 4}
    (mask,) = job.manifest.masks.values()
    assert isinstance(mask, np.ndarray) and mask.nbytes == 20_000 // 8


def _job_into(manifest: Path, output: str) -> Any:
    return build_config({"manifest": str(manifest), "output": output, "model": {"preset": "tiny"}})


def test_an_output_where_a_file_is_in_the_way_is_refused_before_planning(tmp_path: Path) -> None:
    """`validate` and `run` both plan the job: a file at the output path (or above it) is named
    with what to do, where `run` used to stop at its first write with `[Errno 17] File exists`."""
    from pipeline.core.errors import StorageError

    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(3))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(StorageError, match=r"taken is a file: point `output` at a folder"):
        plan_job(_job_into(manifest, str(tmp_path / "taken")))
    with pytest.raises(StorageError, match=r"is under a file \(.*taken\)"):
        plan_job(_job_into(manifest, str(tmp_path / "taken" / "deeper" / "out")))
    assert plan_job(_job_into(manifest, str(tmp_path / "new" / "out"))).pending_rows == 3  # created later, by run


def test_an_output_in_a_bucket_that_does_not_exist_is_refused(tmp_path: Path, s3_bucket: str) -> None:
    from pipeline.core.errors import StorageError

    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(3))
    with pytest.raises(StorageError, match=r"bucket that does not exist \(no-such-bucket-0\): create it"):
        plan_job(_job_into(manifest, "s3://no-such-bucket-0/out"))
    assert plan_job(_job_into(manifest, f"s3://{s3_bucket}/out")).pending_rows == 3


def test_counts_agree_with_their_nouns(tmp_path: Path) -> None:
    from pipeline.core.words import count

    assert [count(0, "row"), count(1, "row"), count(1200, "model call"), count(2, "copy", "copies")] == [
        "0 rows", "1 row", "1,200 model calls", "2 copies",
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", prompt_rows(1))
    lines = "\n".join(plan_job(_job_into(manifest, str(tmp_path / "out"))).summary_lines())
    assert "1 file, 1 row" in lines and "to render  1 row\n" in lines and "1 model call (" in lines

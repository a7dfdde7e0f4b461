"""`sdxl-batch report`: one self-contained HTML page about an output.

It reads what a job leaves under its output prefix (`read`): `stats.json` (the last run), the
per-part stats records in `stats/` (every run), a sample of the metadata and its images, and
`job.json`; turns the records into figures (`figures`) and plots (`plots`); and writes the page
(`page`, from `templates/report.html.j2`) as `report.html` next to them. The page embeds
everything it shows (plots as inline SVG, thumbnails as data: URIs, its CSS) and loads nothing, so
it can be mailed, archived with the output, or opened on a machine without network access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import StorageError
from pipeline.core.io import filesystem, full_uri, join, write_bytes
from pipeline.core.layout import REPORT_FILE
from pipeline.output.lease import describe_writer
from pipeline.output.report.figures import (
    PartsDigest,
    actor_summaries,
    stage_breakdown,
    summarise_parts,
    throughput_series,
)
from pipeline.output.report.page import render_report
from pipeline.output.report.read import OutputContents, read_output

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.core.config import StorageConfig
    from pipeline.plan.executor import PlanExecutor

__all__ = [
    "OutputContents",
    "PartsDigest",
    "actor_summaries",
    "read_output",
    "render_report",
    "stage_breakdown",
    "summarise_parts",
    "throughput_series",
    "write_report",
]


def write_report(
    output: str,
    storage: StorageConfig | None = None,
    *,
    samples: int = 24,
    executor: Callable[[int], PlanExecutor] | None = None,
) -> str:
    """Write `<output>/report.html` and return its URI (a local path, or `s3://...`).

    Args:
        output: the job's output prefix, local or object store.
        storage: the object-store options (endpoint, credentials); None for the defaults.
        samples: images on the contact sheet, spread evenly over the ids.
        executor: picks where the parts are read (`plan.executor`) from their count; None: here.

    Raises:
        SdxlBatchError: the output does not exist or holds no committed part.
        StorageError: the output cannot be read or the report cannot be written.
    """
    fs, root = filesystem(output, storage)
    contents = read_output(fs, root, output, samples=samples, storage=storage, executor=executor)
    contents.writer = describe_writer(fs, root)  # a job writing now: its figures are still moving
    html = render_report(contents)
    path = join(root, REPORT_FILE)
    try:
        write_bytes(fs, path, html.encode("utf-8"))
    except OSError as error:
        raise StorageError(f"cannot write the report to {full_uri(fs, path)}: {error}") from error
    return full_uri(fs, path)

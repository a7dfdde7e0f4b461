"""Our errors, recovered from the text Ray keeps, whatever module path the text names."""

from __future__ import annotations

import pytest

from pipeline.core import errors
from pipeline.core.errors import ClusterError, ModelError, SdxlBatchError, WorkerDiedError, error_from_text

TRACEBACK = """Traceback (most recent call last):
  File "/x/stages.py", line 80, in __init__
    self.generator.load()
{line}
Failed to apply UDF transform after 1/1 attempts."""


@pytest.mark.parametrize(
    "printed",
    ["pipeline.core.errors.ModelError", "pipeline.errors.ModelError", "somewhere_else.ModelError", "ModelError"],
)
def test_our_error_is_found_by_its_class_name_whatever_the_module_path(printed: str) -> None:
    found = error_from_text(TRACEBACK.format(line=f"{printed}: weights x do not fit"))
    assert type(found) is ModelError and str(found) == "weights x do not fit"


def test_other_errors_are_not_ours() -> None:
    assert error_from_text(TRACEBACK.format(line="torch.OutOfMemoryError: CUDA out of memory")) is None
    assert error_from_text("no traceback here") is None


def test_every_error_type_lives_in_errors_under_a_unique_name() -> None:
    kinds = errors.error_types()
    assert {"ClusterError", "ModelError", "WorkerDiedError", "ManifestError", "StorageError"} <= set(kinds)
    assert all(kind.__module__ == errors.__name__ for kind in kinds.values())
    assert issubclass(ClusterError, SdxlBatchError) and issubclass(WorkerDiedError, SdxlBatchError)

"""Ray's runtime-env hook for the tests (`RAY_RUNTIME_ENV_HOOK=forward_env.hook`): the driver's
SDXL_BATCH_TEST_* variables go into its job's runtime env, so that the job's worker processes on a
shared cluster start with the faults of `sitecustomize` turned on, and other jobs' do not."""

from __future__ import annotations

import os
from typing import Any


def hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    faults = {key: value for key, value in os.environ.items() if key.startswith("SDXL_BATCH_TEST_")}
    merged = dict(runtime_env or {})
    merged["env_vars"] = {**(merged.get("env_vars") or {}), **faults}
    return merged

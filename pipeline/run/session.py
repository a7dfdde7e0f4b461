"""The Ray session of a driver: join a cluster or start an embedded Ray, with the libraries'
console chatter quieted. Shared by `run` and by `submit`, which sets the same environment on the
jobs it sends."""

from __future__ import annotations

import logging
import os
from typing import Any


def init_ray(address: str | None, *, metrics_port: int | None = None) -> None:
    """Join the cluster at `address` (`auto`: the one `ray start` runs on this machine), or start
    an embedded local Ray when it is None (serving its Prometheus metrics on `metrics_port`, if
    given; a cluster's nodes take `ray start --metrics-export-port`).

    The embedded Ray serves this process alone, so it listens on loopback only: Ray otherwise
    binds its node to the machine's network address. (Ray reads this switch, named for its
    macOS/Windows single-node mode, when it is imported.)
    """
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray 2.60 warns on every start of a local instance that it enabled token authentication
        # (with RAY_AUTH_MODE unset): nothing a user of this process-private, loopback-only Ray can
        # act on. Shown with -v (INFO level), as the rest of the libraries' chatter.
        token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if logging.getLogger().getEffectiveLevel() > logging.INFO:
            token_setup.setLevel(logging.ERROR)
    import ray

    if ray.is_initialized():
        return
    ray.init(
        # "local" always starts a new instance; None would attach to whatever cluster `ray start`
        # last recorded on this machine (even a dead one), which is not what the user asked for.
        address=address or "local",
        include_dashboard=False,
        _metrics_export_port=metrics_port if address is None else None,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env=_quiet_runtime_env(),
    )
    quiet_ray_data_console()


QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _quiet_runtime_env() -> dict[str, Any] | None:
    """Workers import transformers before our code can quiet it; these variables stop the
    import-time chatter. Inside a submitted job they are already set (`sdxl-batch submit` puts
    them in the job's runtime env, which Ray refuses to see repeated)."""
    missing = {key: value for key, value in QUIET_ENV.items() if os.environ.get(key) != value}
    return {"env_vars": missing} if missing else None


def quiet_ray_data_console() -> None:
    """Ray Data prints its plan and errors on the console; our progress line and error messages
    say enough. Its full log still goes to the session's ray-data.log file."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Our stages raise errors a user can act on (StorageError, ManifestError, ModelError); by
    # default Ray Data replaces them with a UserCodeException that keeps only their text.
    context.raise_original_map_exception = True
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            # Failures reach the driver as exceptions, which the CLI reports (ours without a
            # traceback); Ray Data's own copy of them stays in its log file.
            handler.setLevel(logging.CRITICAL)

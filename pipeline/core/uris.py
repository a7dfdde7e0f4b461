"""Which URIs may name model weights. Checked when a config is validated, and again where
weights are resolved."""

from __future__ import annotations

import fsspec

# Where weights may come from. Other URL schemes (http(s)://, ftp://, gs://, chained fsspec URLs)
# are refused rather than handed to fsspec, which would fetch from anywhere it has a driver for.
_SCHEMES = (None, "hf", "file", "s3", "s3a")
ACCEPTED_SOURCES = "a hub id ORG/REPO, hf://ORG/REPO or hf://ORG/REPO/FILE, a local path (or file://), or an s3:// URI"


def weights_source_problem(ref: str) -> str | None:
    """Why `ref` is not an accepted weights source, or None when it is one."""
    scheme = fsspec.core.split_protocol(ref)[0]
    if scheme in _SCHEMES and "::" not in ref:
        return None
    return f"{scheme}:// is not an accepted weights source; accepted: {ACCEPTED_SOURCES}"

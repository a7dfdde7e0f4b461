"""What one model call renders: the settings its images share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RenderSettings:
    """Settings shared by every image of one model call; rows batch only with equal settings."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    negative: bool = False

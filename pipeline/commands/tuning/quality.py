"""The quality gate: a setting that changes pixels is accepted only when its images stay close to
the reference setting's.

Every load renders the same few rows of the sample (fixed prompts and seeds) and sends their
pixels to one `QualityJudge` actor. The reference of each GPU type (float32 or bfloat16, eager,
every switch off: `SearchSpace.reference_for`) is what the others are compared with, on the same
type: PSNR in dB (higher is closer) or the mean absolute difference in 0-255 levels (lower is
closer), as refiners' image tests compare, with tolerances rather than bytes. The fastest setting
is never a broken one: a precision that overflows to black images or a kernel that corrupts
attention fails the gate, is shown with its difference, and is never chosen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError

# Thresholds: SDXL at one seed in bfloat16 against float32 differs in fine detail (tens of dB of
# PSNR); a broken setting (NaN decoded as black, noise) scores under 12 dB.
DEFAULT_THRESHOLDS = {"psnr": 20.0, "mad": 16.0}
QUALITY_ROWS = 4  # rows of the sample every load renders for the gate


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 image stacks, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def mean_absolute_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


@dataclass(frozen=True)
class QualityGate:
    """The metric and its threshold (`--quality psnr:20`, `--quality mad:16`)."""

    metric: str = "psnr"
    threshold: float = DEFAULT_THRESHOLDS["psnr"]

    @classmethod
    def parse(cls, text: str | None) -> QualityGate:
        if not text:
            return cls()
        metric, _, value = text.partition(":")
        metric = metric.strip().lower()
        if metric not in DEFAULT_THRESHOLDS:
            raise ConfigError(f"--quality: {metric!r} is not a metric: psnr[:DB] or mad[:LEVELS]")
        try:
            threshold = float(value) if value else DEFAULT_THRESHOLDS[metric]
        except ValueError:
            raise ConfigError(f"--quality: cannot read the threshold {value!r} (e.g. psnr:20 or mad:16)") from None
        return cls(metric, threshold)

    def measure(self, images: np.ndarray, reference: np.ndarray) -> tuple[float, bool]:
        if images.shape != reference.shape:
            return (0.0 if self.metric == "psnr" else 255.0), False
        if self.metric == "psnr":
            value = psnr(images, reference)
            return value, value >= self.threshold
        value = mean_absolute_difference(images, reference)
        return value, value <= self.threshold

    def describe(self) -> str:
        return f"PSNR >= {self.threshold:g} dB" if self.metric == "psnr" else f"mean |diff| <= {self.threshold:g}"


@dataclass(frozen=True)
class Verdict:
    metric: str
    value: float  # PSNR in dB, or mean absolute difference; inf/0 for the reference itself
    passed: bool
    reference: str  # the reference load's key

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["value"] = None if math.isinf(self.value) else round(self.value, 3)
        return data


class QualityJudge:
    """A Ray actor on the driver's side holding each type's reference pixels: loads send their
    quality rows' pixels (`submit`), and the verdicts are asked for by key (`verdict`). A load's
    pixels wait for their type's reference when they arrive first, and are dropped once judged,
    so memory holds a reference per type and the loads not judged yet."""

    def __init__(self, gate: QualityGate):
        self.gate = gate
        self.references: dict[str, tuple[str, np.ndarray]] = {}
        self.waiting: dict[tuple[str, str], np.ndarray] = {}
        self.verdicts: dict[tuple[str, str], Verdict] = {}

    def submit(self, accelerator_type: str, key: str, images: np.ndarray, *, reference: bool) -> None:
        if reference:
            self.references[accelerator_type] = (key, images)
            self.verdicts[(accelerator_type, key)] = Verdict(
                self.gate.metric, math.inf if self.gate.metric == "psnr" else 0.0, True, key
            )
            for (kind, other), pixels in list(self.waiting.items()):
                if kind == accelerator_type:
                    self._judge(kind, other, pixels)
                    del self.waiting[(kind, other)]
        elif accelerator_type in self.references:
            self._judge(accelerator_type, key, images)
        else:
            self.waiting[(accelerator_type, key)] = images

    def _judge(self, accelerator_type: str, key: str, images: np.ndarray) -> None:
        reference_key, reference = self.references[accelerator_type]
        value, passed = self.gate.measure(images, reference)
        self.verdicts[(accelerator_type, key)] = Verdict(self.gate.metric, value, passed, reference_key)

    def verdict(self, accelerator_type: str, key: str) -> dict[str, Any] | None:
        found = self.verdicts.get((accelerator_type, key))
        return found.to_dict() if found else None

    def reference_pixels(self, accelerator_type: str) -> np.ndarray | None:
        found = self.references.get(accelerator_type)
        return found[1] if found else None

    def all_verdicts(self) -> dict[str, dict[str, Any]]:
        return {f"{kind}/{key}": verdict.to_dict() for (kind, key), verdict in self.verdicts.items()}

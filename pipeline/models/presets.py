"""Model presets: each pins the weights, the scheduler and its config, and the defaults that make
the model work as its authors intended.

Settings follow the source articles: base SDXL keeps its stored scheduler (30 steps, CFG 5.0);
SDXL-Lightning uses plain Euler with *trailing* timestep spacing (so the first step starts at
the last training timestep, as the distillation assumed) and no CFG, because guidance was baked
in during distillation and applying it again degrades the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ModelError

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
TINY = "tiny"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base: str
    unet: str | None
    scheduler: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 4
    guidance_scale: float = 0.0
    width: int = 1024
    height: int = 1024
    licence: str = ""

    def summary(self) -> dict[str, Any]:
        """What the metadata records about the model, beyond the per-row settings."""
        return {"preset": self.name, "scheduler": self.scheduler, "scheduler_config": dict(self.scheduler_config)}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="Random-weight miniature SDXL built offline from configs (demo and tests; not a real model).",
            base=TINY,
            unet=None,
            scheduler="EulerDiscreteScheduler",
            scheduler_config={"timestep_spacing": "trailing"},
            steps=4,
            guidance_scale=0.0,
            width=128,
            height=128,
            licence="Apache-2.0 (generated)",
        ),
        Preset(
            name="sdxl-base",
            description="SDXL base 1.0, the baseline: its own stored scheduler, 30 steps, CFG 5.0.",
            base=SDXL_BASE,
            unet=None,
            scheduler="stored",
            steps=30,
            guidance_scale=5.0,
            licence="CreativeML Open RAIL++-M",
        ),
        Preset(
            name="lightning-4step",
            description="SDXL-Lightning 4-step UNet (ByteDance) on SDXL base 1.0: Euler, trailing spacing, no CFG.",
            base=SDXL_BASE,
            unet="hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
            scheduler="EulerDiscreteScheduler",
            scheduler_config={"timestep_spacing": "trailing"},
            steps=4,
            guidance_scale=0.0,
            licence="OpenRAIL++",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None

"""sdxl-batch: distributed batch image generation with distilled SDXL models on Ray Data."""

__version__ = "0.1.0"

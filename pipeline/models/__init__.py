"""Model presets, weight resolution and the generator wrapper around diffusers."""

"""Commands built on running jobs: comparing presets, tuning and estimating, submitting to a
cluster through the Ray Jobs API."""

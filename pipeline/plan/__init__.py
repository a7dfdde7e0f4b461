"""Before any GPU work, on the driver: reading and validating the manifest, row rules, per-row
settings, the ledger of committed rows, and the job plan (what is left to render)."""

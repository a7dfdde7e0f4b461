"""`sdxl-batch tune` and `sdxl-batch estimate`: throughput per GPU type, and what a job will take.

`tune` runs on every GPU of a cluster at once, per GPU type, on Ray Tune: each trial loads the
model once with one *load setting* (`space`) on one GPU of its type and measures the job's own
stages at several *batch settings* on it (`trial`, `sweep`); the search over load settings runs
per type (`plan`), a quality gate keeps broken settings out (`quality`), measured loads are cached
(`cache`), and the results choose a setting per type and one fleet setting (`results`), written as
`tune.json`, a table, `tune.html` (`page`) and a config with a `fleet:` section (`outputs`).
`estimate` prices a job on a fleet from those figures (`cost`, `estimate`).
"""

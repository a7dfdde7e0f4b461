"""Ray job entrypoint: `python jobs/generate.py CONFIG [--manifest URI] [--output URI] [--set k=v]`.

Submitted through the Ray Jobs API with `pipeline/`, `jobs/` and `configs/` as the working
directory; inside a Ray job, `ray.init()` joins the cluster the job runs on.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The submitted working directory's code first (`python jobs/generate.py` puts only jobs/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--no-progress", *sys.argv[1:]]))

"""Run every recipe of `scripts/results.yaml` on the real development data and write the results table.

    python scripts/results.py --data ../shared/data --doc docs/results.md     # or: make results DATA=../shared/data
    python scripts/results.py --data ../shared/data --quick --out runs/results-quick   # smoke test, no figures

Each row is `ftlab fit` + `ftlab test --ckpt_path best` in `runs/results/runs/<row>/`; a finished row is never rerun
(delete its folder to rerun it), a cut one resumes from its last.ckpt. `--all` adds the stand-in recipes.
"""

from __future__ import annotations

import sys

from lightning_modules.sweeps.recipes import main

if __name__ == "__main__":
    sys.exit(main())

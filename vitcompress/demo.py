"""``vitcompress demo``: the main job.

Trains the digits testbed (or reuses it from the cache when the recipe is unchanged), then runs the
bundled ``recipes/demo.yaml`` sweep: token reduction, quantization and pruning alone and stacked, with
accuracy on digits / digits-c and latency on this machine, and writes the Pareto report.
"""

from __future__ import annotations

from pathlib import Path

from .sweep import run_sweep

DEFAULT_RECIPE = "digits_vit"
DEFAULT_SWEEP = "demo"
DEFAULT_OUT = "vitcompress-demo"


def run_demo(out: str | Path = DEFAULT_OUT, *, recipe: str = DEFAULT_SWEEP, progress: bool = False,
             log=print) -> Path:
    """Train-or-reuse the testbed, run the demo sweep (every method alone and stacked), write the report.

    Returns the sweep directory (``report.md``, ``pareto.png``, ``points.csv``, ``pareto.json``, ``points/``).
    """
    run_sweep(recipe, out, progress=progress, log=log)
    log(f"wrote {Path(out) / 'report.md'} and {Path(out) / 'pareto.png'}")
    return Path(out)

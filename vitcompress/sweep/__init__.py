"""``vitcompress sweep RECIPE --out DIR``: the one runner. It applies compression stacks to one base model and
measures each point (accuracy, speed in a runtime, size, robustness), resumably; ``config`` holds the recipe
format, ``run`` the runner."""

from .config import Point, SweepConfig, dense_point, expand, load_sweep, point_id
from .run import SweepContext, attack_label, build_point, deploy, resolve_base, run_sweep

__all__ = ["Point", "SweepConfig", "SweepContext", "attack_label", "build_point", "deploy",
           "dense_point", "expand", "load_sweep", "point_id", "resolve_base", "run_sweep"]

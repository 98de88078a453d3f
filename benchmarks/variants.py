"""The benchmark recipes: ``benchmarks/recipes/NAME.yaml`` maps variant names to stacks for ``apply_stack``.

Every step is a transform's versioned config dict, as in sweep recipes and the CLI. One runner-level form exists:
``target_flops: {match: NAME}`` solves for the GFLOPs fraction that the variant NAME measured earlier in the run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vitcompress.errors import ConfigError

RECIPES = Path(__file__).resolve().parent / "recipes"
Stack = list[dict[str, Any]]


def load(name: str) -> dict[str, Any]:
    """The parsed ``benchmarks/recipes/<name>.yaml``."""
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def resolve(stack: Stack, measured: dict[str, float]) -> Stack:
    """A copy of ``stack`` with each ``target_flops: {match: NAME}`` replaced by ``measured[NAME]``."""
    out = copy.deepcopy(stack)
    for step in out:
        tf = step.get("target_flops")
        if isinstance(tf, dict):
            if tf.get("match") not in measured:
                raise ConfigError(f"target_flops matches '{tf.get('match')}', which was not measured before it")
            step["target_flops"] = measured[tf["match"]]
    return out


def select(variants: dict[str, Stack], names: str | None) -> dict[str, Stack]:
    """``variants`` restricted to the comma-separated ``names`` (all when None), in the recipe's order."""
    if not names:
        return variants
    wanted = names.split(",")
    unknown = [n for n in wanted if n not in variants]
    if unknown:
        raise ConfigError(f"unknown variant(s): {', '.join(unknown)} (known: {'; '.join(variants)})")
    return {k: v for k, v in variants.items() if k in wanted}

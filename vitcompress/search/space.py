"""The search space: families of compression steps, each a choice among options (or none), whose numbers are
ranges or choices. A trial's sample is a stack in the family order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..recipes import recipe_path
from ..train import load_recipe
from ..transforms import config_from_dict

DEFAULT = "search_space"


@dataclasses.dataclass
class SearchSpace:
    """families: {family: [option, ...]} in stack order; an option is a step dict whose values may be [lo, hi]
    (numbers: a continuous range) or a list of strings (a choice), or a list of such steps (a sub-stack, e.g. a
    MiniViT sharing and the recovery that makes it usable)."""

    families: dict[str, list[Any]]

    def for_target(self, exported: bool) -> SearchSpace:
        """The options a target can run: an exported file takes the steps whose configs say they are ``exportable``
        (static shapes, deployed layers)."""
        if not exported:
            return self
        keep = {f: [o for o in opts if all(_exportable(s) for s in _steps(o))] for f, opts in self.families.items()}
        return SearchSpace({f: opts for f, opts in keep.items() if opts})

    def sample(self, trial: Any) -> list[dict[str, Any]]:
        """One stack from an Optuna trial: per family an option index (or none), then each of its parameters."""
        stack = []
        for family, options in self.families.items():
            pick = trial.suggest_categorical(family, ["none", *[str(i) for i in range(len(options))]])
            if pick == "none":
                continue
            steps = _steps(options[int(pick)])
            stack += [_sample_step(trial, f"{family}.{pick}." + (f"{i}." if len(steps) > 1 else ""), s)
                      for i, s in enumerate(steps)]
        return stack


def _sample_step(trial: Any, prefix: str, option: dict[str, Any]) -> dict[str, Any]:
    """One step of an option: each range or choice sampled under the parameter name ``prefix + key``."""
    step = {}
    for key, value in option.items():
        if _is_range(value):
            step[key] = round(trial.suggest_float(prefix + key, float(value[0]), float(value[1])), 4)
        elif isinstance(value, list):
            step[key] = trial.suggest_categorical(prefix + key, [str(v) for v in value])
        else:
            step[key] = value
    return step


def _steps(option: Any) -> list[dict[str, Any]]:
    return option if isinstance(option, list) else [option]


def _is_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in value)


def _exportable(step: dict[str, Any]) -> bool:
    """What the step's config says, at its fixed settings with each range or choice at its first value (a choice
    whose values differ in this should be two options)."""
    try:
        return config_from_dict({k: v[0] if isinstance(v, list) and v else v for k, v in step.items()}).exportable
    except ConfigError as e:
        raise ConfigError(f"search space option {step}: {e}") from None


def load_space(path: str | Path | None = None) -> SearchSpace:
    """A space from a YAML file (``search:`` maps each family to its options) or the bundled default."""
    data = load_recipe(recipe_path(str(path or DEFAULT)))
    fams = data.get("search") if isinstance(data, dict) else None
    if not isinstance(fams, dict) or not fams:
        raise ConfigError(f"the search space {path or DEFAULT} is empty: it needs 'search:' with at least one family")
    out: dict[str, list[Any]] = {}
    for family, options in fams.items():
        if not isinstance(options, list) or not options or not all(
                _steps(o) and all(isinstance(s, dict) and "name" in s for s in _steps(o)) for o in options):
            raise ConfigError(f"search space family '{family}' must be a non-empty list of steps with a name "
                              "(or of lists of such steps)")
        for o in (s for opt in options for s in _steps(opt)):
            for key, value in o.items():
                if _is_range(value) and float(value[0]) > float(value[1]):
                    raise ConfigError(f"search space {family}: {key} range [{value[0]}, {value[1]}] is reversed")
        out[str(family)] = options
    return SearchSpace(out)

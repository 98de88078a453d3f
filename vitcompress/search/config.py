"""The search's settings: :class:`SearchConfig`, its target runtime and its metric."""

from __future__ import annotations

import dataclasses

from ..config import Config, StrEnum
from ..errors import ConfigError
from ..export import Runtime


def point_runtime(target: Runtime) -> Runtime:
    """The runtime a sweep point of this target runs in: cuda is torch-compile (timed on the GPU)."""
    return Runtime.TORCH_COMPILE if target == Runtime.CUDA else target


class Metric(StrEnum):
    TOP1 = "top1"
    AGREEMENT = "agreement"  # no labels needed: the share of images where the compressed model agrees


@dataclasses.dataclass
class SearchConfig(Config):
    """model: a timm id, an artifact, or ``recipe:NAME`` (a bundled training recipe's cached baseline); data: its
    train split gives the calibration and the held-out images, its test split the reported drop. max_drop: points of
    ``metric`` the chosen stack may lose on held-out data. target: where it will run, timed at ``batch_size``.
    budget_minutes: wall-clock for the whole search. space: a search-space YAML (default: the bundled one). heldout /
    heldout_small: held-out images for the full and the first, cheap accuracy check (default: 2,000 and 500, or what
    the train split allows). n_trials: stop after this many trials in all (default: when the budget is spent).
    storage: the study's Optuna RDB URL (default ``sqlite:///OUT/study.db``; ``postgresql://...`` or ``mysql://...``
    to spread a search over machines). worker: join that study and run trials only; the process started without
    ``--worker`` chooses, exports and writes the reports."""

    NAME = "search"
    VERSION = 1
    model: str = ""
    data: str = ""
    max_drop: float = 1.0
    metric: Metric = Metric.TOP1
    target: Runtime = Runtime.TORCH
    batch_size: int = 64
    budget_minutes: float = 30.0
    space: str | None = None
    heldout: int | None = None
    heldout_small: int | None = None
    calib_size: int = 32
    repeat: int = 5
    seed: int = 0
    n_trials: int | None = None
    storage: str | None = None
    worker: bool = False

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("search needs a model and --data")
        if not self.max_drop >= 0:
            raise ConfigError(f"max_drop is the points of accuracy the search may lose, >= 0; got {self.max_drop}")
        if not self.budget_minutes >= 1:
            raise ConfigError(f"budget_minutes {self.budget_minutes} is too small to time the dense model and one "
                              "trial: give at least 1")
        if self.storage is not None and "://" not in self.storage:
            raise ConfigError(f"storage is an Optuna RDB URL (sqlite:///PATH, postgresql://USER@HOST/DB, ...), got "
                              f"'{self.storage}'")
        if self.worker and self.storage is None:
            raise ConfigError("--worker joins a study in a shared --storage (e.g. postgresql://...): give --storage")
        for name in ("batch_size", "repeat", "heldout", "heldout_small", "n_trials"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")

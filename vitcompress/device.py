"""Where things run: one rule for every command (evaluation, training, recovery, learned merging, timing)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` / ``cuda[:N]`` as given (cuda must exist)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' requested but no CUDA device is available")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device '{spec}' (expected auto, cpu or cuda[:N])") from None

"""What every measured number is recorded with: the device, the package versions and the date."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import platform
from typing import Any

import timm
import torch

from ._version import __version__
from .kernels._triton import triton


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide numbers: recorded next to every result."""
    out = {"vitcompress": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "triton": None if triton is None else triton.__version__}
    for name in ("onnxruntime", "openvino", "nncf"):  # the export runtimes, where installed
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu: MODEL (N threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({threads} threads)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({threads} threads)"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_context(device: torch.device | None = None) -> dict[str, Any]:
    """``{"device", "versions", "date"}`` for a result file (device omitted when None)."""
    out: dict[str, Any] = {} if device is None else {"device": device_name(device)}
    return {**out, "versions": versions(), "date": utc_now()}

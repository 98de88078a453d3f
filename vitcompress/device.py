"""Where things run: one rule for every command (evaluation, training, recovery, learned merging, timing)."""

from __future__ import annotations

import functools
import os

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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return frozenset(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


# oneDNN ISA caps below the first level with an exact int8 dot product (VNNI). oneDNN reads the cap from
# ONEDNN_MAX_CPU_ISA and, still, from its older name DNNL_MAX_CPU_ISA (the new name wins where both are set)
_ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_NO_VNNI_CAPS = {"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"}


def onednn_int8_exact() -> bool:
    """Whether oneDNN's u8 x s8 int8 GEMM sums products exactly on this CPU: with VNNI or AMX it does; without
    (AVX2-only CPUs such as AMD Zen 3, AVX-512 without VNNI, or oneDNN capped below VNNI) it multiplies with
    vpmaddubsw, whose int16 pair sums saturate once two adjacent u8 x s8 products pass 32767."""
    cap = next((os.environ[v] for v in _ISA_CAP_VARS if os.environ.get(v)), "ALL")
    if cap.strip().upper() in _NO_VNNI_CAPS:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())

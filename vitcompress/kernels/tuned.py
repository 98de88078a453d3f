"""Which path runs a quantized GEMM (or a biased attention) fastest, per shape: a committed per-architecture table.

The table (``tuned/sm90.json`` for Hopper; ``VITCOMPRESS_GEMM_TABLE=FILE`` overrides it) is measured on a GPU by
``python -m vitcompress.kernels.tune`` (the GPU runbook's ``headline`` step writes it first), never autotuned at
run time. Under ``backend="auto"`` every caller asks :func:`gemm_path`:

- ``vendor``: torch's own kernel (``torch._int_mm`` for int8, row-wise ``torch._scaled_mm`` for fp8, SDPA with a
  float mask for attention); Inductor fuses the quantize and dequantize around it in a compiled graph;
- ``triton``: our kernel with its fused epilogue.

Each entry also times the bf16 matmul at the same shape: :func:`dense_faster` tells a quantizer which layers to
keep in bf16 (``QuantConfig.dense_fallback``).

A shape the table does not hold takes ``vendor``, so ``auto`` is never slower than the path it replaces. Entries
are keyed ``OP:NxK`` (``int8:2304x768``: N outputs, K inputs; ``attention:NxD``: tokens, head dim) and hold a sorted
list of M (rows: batch x tokens, or batch x heads for attention) with the best path measured at each; a call takes
the entry's M nearest in log space.
"""

from __future__ import annotations

import enum
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
TABLE_VERSION = 1


class GemmPath(str, enum.Enum):
    """Where one quantized GEMM runs (see the module docstring). A str-Enum: ``GemmPath.VENDOR == "vendor"``."""

    VENDOR = "vendor"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


def arch_name(device: torch.device | str) -> str:
    """``sm90`` for a Hopper GPU, ``cpu`` for the CPU (which has no table)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def read_table(path: str | os.PathLike) -> dict[str, Any]:
    """A table file, checked: ValueError (naming the file) for a malformed one."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"GEMM table {path}: cannot read it ({e})") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not isinstance(table.get("entries"),
                                                                                                dict):
        raise ValueError(f"GEMM table {path}: not a version-{TABLE_VERSION} table with 'entries'")
    for key, e in table["entries"].items():
        if len(e.get("m", [])) != len(e.get("best", [])) or not e["m"] or \
                any(p not in GemmPath._value2member_map_ for p in e["best"]):
            raise ValueError(f"GEMM table {path}: entry {key} needs equal, non-empty 'm' and 'best' lists "
                             f"of {[p.value for p in GemmPath]}")
    return table


_TABLES: dict[str, dict[str, Any] | None] = {}


def table_for(arch: str) -> dict[str, Any] | None:
    """The table for ``arch`` (``VITCOMPRESS_GEMM_TABLE`` first, then ``tuned/<arch>.json``), or None; read once."""
    override = os.environ.get("VITCOMPRESS_GEMM_TABLE")
    key = f"{arch}|{override}"
    if key not in _TABLES:
        path = Path(override) if override else TUNED_DIR / f"{arch}.json"
        _TABLES[key] = read_table(path) if path.is_file() else None
    return _TABLES[key]


def _nearest(table: dict[str, Any] | None, op: str, m: int, n: int, k: int) -> tuple[dict[str, Any], int] | None:
    """The entry for ``op`` at N x K and the index of its row count nearest ``m`` in log space, or None."""
    entry = None if table is None else table["entries"].get(f"{op}:{n}x{k}")
    if entry is None:
        return None
    ms = entry["m"]
    return entry, min(range(len(ms)), key=lambda j: abs(math.log(max(m, 1)) - math.log(ms[j])))


def lookup(table: dict[str, Any] | None, op: str, m: int, n: int, k: int) -> GemmPath:
    """The best path in ``table`` for ``op`` at M x N x K (``vendor`` where the table has no entry)."""
    hit = _nearest(table, op, m, n, k)
    return GemmPath.VENDOR if hit is None else GemmPath(hit[0]["best"][hit[1]])


def dense_faster(table: dict[str, Any] | None, op: str, m: int, n: int, k: int) -> bool:
    """Whether ``table`` measured the bf16 matmul faster than both quantized paths for ``op`` at M x N x K (False
    where it has no such entry or no timings)."""
    hit = _nearest(table, op, m, n, k)
    if hit is None or not hit[0].get("ms"):
        return False
    t, i = hit[0]["ms"], hit[1]
    return t["dense"][i] < min(t["vendor"][i], t["triton"][i])


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in (shapes are static there)
def _cuda_arch(index: int) -> str:
    return arch_name(torch.device("cuda", index))


def gemm_path(op: str, m: int, n: int, k: int, device: torch.device) -> GemmPath:
    """The path ``backend="auto"`` takes for ``op`` (``int8``, ``fp8``, ``attention``) at M x N x K on ``device``.
    Off CUDA there is no table: ``vendor``."""
    if device.type != "cuda":
        return GemmPath.VENDOR
    return lookup(table_for(_cuda_arch(device.index if device.index is not None else torch.cuda.current_device())),
                  op, m, n, k)

"""Measure the per-shape GEMM table that ``backend="auto"`` reads (:mod:`.tuned`) on this GPU.

    python -m vitcompress.kernels.tune --out vitcompress/kernels/tuned/sm90.json  # on the GPU (the runbook does)
    python -m vitcompress.kernels.tune --seed-from kernels.json --out T.json   # from a kernel benchmark's JSON

For each quantized GEMM shape (ViT-B and its pruned widths) and each row count M (batch x tokens at batch 1, 64
and 256, with full and merged token counts), it times the vendor path and our Triton kernel on the same codes,
both with their output in bf16, and the bf16 matmul on the same shape for reference (CUDA events, median). For
attention with a per-key bias (ToMe's proportional attention) it times SDPA with a float mask against our kernel.
The faster quantized path at each M becomes the entry's ``best``; ``dense_ms`` shows where bf16 would be faster
still. ``--smoke`` runs tiny shapes on the CPU through the Triton interpreter to check the script (no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import fp8_gemm as f8
from . import int8_gemm as i8
from ._triton import triton
from .attention import attention
from .tuned import TABLE_VERSION, arch_name, read_table

GEMM_SHAPES = {  # name: (N, K)
    "qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072),
    "qkv heads -25 %": (1728, 768), "proj heads -25 %": (768, 576), "fc1 MLP -50 %": (1536, 768),
    "fc2 MLP -50 %": (768, 1536),
}
ROWS = (197, 1576, 6400, 12608, 25600, 50432)  # 197 tokens x {1, 8, 64, 256}; ~100 merged tokens x {64, 256}
ATTN_TOKENS = (197, 119, 41)  # ViT-B/16 ToMe r=13: the first, middle and last layers' token counts
ATTN_BATCH_HEADS = (12, 768, 3072)  # 12 heads x batch 1, 64, 256
SMOKE_SHAPES, SMOKE_ROWS = {"tiny": (48, 32)}, (5, 40)


def _time_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples)


def gemm_candidates(op: str, m: int, n: int, k: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The callables timed for one quantized GEMM: ``vendor``, ``triton`` and ``dense`` (bf16)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g, dtype=torch.float32)
    w = torch.randn(n, k, device=device, generator=g, dtype=torch.float32) / k**0.5
    bias = torch.zeros(n, device=device, dtype=torch.float32)
    xb, wb = x.bfloat16(), w.bfloat16()
    if op == "int8":
        q, s = i8.quantize_per_token_ref(x)
        wq, ws = i8.quantize_per_token_ref(w)
        wt = wq.t()  # column-major [K, N], as Int8Linear stores it
        return {"vendor": lambda: i8.int8_gemm(q, wt, s, ws, bias, backend="torch"),
                "triton": lambda: i8.int8_gemm(q, wt, s, ws, bias, backend="triton"),
                "dense": lambda: F.linear(xb, wb)}
    q, s = f8.quantize_per_token_fp8_ref(x)
    wq, ws = f8.quantize_per_token_fp8_ref(w)
    wt = wq.t()
    vendor = (lambda: f8.scaled_mm(q, wt, s, ws, bias)) if f8.scaled_mm_rowwise(str(device)) else \
        (lambda: f8.fp8_gemm(q, wt, s, ws, bias, backend="torch"))
    return {"vendor": vendor, "triton": lambda: f8.fp8_gemm(q, wt, s, ws, bias, backend="triton"),
            "dense": lambda: F.linear(xb, wb)}


def attention_candidates(bh: int, n: int, d: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """SDPA with a float per-key mask (``vendor``) against our kernel with a key bias (``triton``), bf16."""
    heads = 12 if bh % 12 == 0 else 1
    b = bh // heads
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, d, device=device, generator=g).bfloat16() for _ in range(3))
    bias = torch.rand(b, n, device=device, generator=g).log().bfloat16()
    mask = bias[:, None, None, :]
    return {"vendor": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "triton": lambda: attention(q, k, v, key_bias=bias, backend="triton"),
            "dense": lambda: F.scaled_dot_product_attention(q, k, v)}


def measure(device: torch.device, repeat: int, smoke: bool = False) -> dict[str, Any]:
    """The table for ``device``: ``{version, arch, device, torch, triton, date, entries: {OP:NxK: {m, best, ms}}}``."""
    shapes, rows = (SMOKE_SHAPES, SMOKE_ROWS) if smoke else (GEMM_SHAPES, ROWS)
    entries: dict[str, Any] = {}
    ops = ["int8", "fp8"]

    def add(key: str, ms_rows: list[dict[str, float]], ms: list[int], what: str) -> None:
        best = ["triton" if r["triton"] < r["vendor"] else "vendor" for r in ms_rows]
        entries[key] = {"what": what, "m": ms, "best": best,
                        "ms": {p: [round(r[p], 5) for r in ms_rows] for p in ("vendor", "triton", "dense")}}

    for op in ops:
        for name, (n, k) in shapes.items():
            key = f"{op}:{n}x{k}"
            if key in entries:
                continue
            ms_rows = []
            for m in rows:
                cands = gemm_candidates(op, m, n, k, device)
                ms_rows.append({p: _time_ms(fn, device, repeat) for p, fn in cands.items()})
            add(key, ms_rows, list(rows), f"ViT-B {name}" if not smoke else name)
    tokens, bhs = ((9, 5), (2, 4)) if smoke else (ATTN_TOKENS, ATTN_BATCH_HEADS)
    for n in tokens:
        ms_rows = [{p: _time_ms(fn, device, repeat) for p, fn in attention_candidates(bh, n, 64 if not smoke else 16,
                                                                                    device).items()} for bh in bhs]
        add(f"attention:{n}x{64 if not smoke else 16}", ms_rows, list(bhs), f"attention with a key bias, {n} tokens")
    return {"version": TABLE_VERSION, "arch": arch_name(device), "device": _device_name(device),
            "torch": torch.__version__, "triton": _triton_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
            "repeat": repeat, "smoke": smoke, "entries": entries}


def seed_from(path: Path) -> dict[str, Any]:
    """A table from a kernel benchmark's JSON (``benchmarks.kernels``: ``gemm`` rows with ``ms`` per path), for a
    GPU that has not run this tuner yet. Its vendor int8 time has no dequantize: a compiled graph fuses that."""
    res = json.loads(path.read_text())
    names = {"int8": ("torch._int_mm (no dequant)", "int8 gemm (ours, fused epilogue)"),
             "fp8": ("fp8 torch._scaled_mm (row-wise)", "fp8 gemm (ours, fused epilogue)")}
    grouped: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for row in res["gemm"]:
        for op, (vendor, ours) in names.items():
            ms = row["ms"]
            if ms.get(vendor) is None or ms.get(ours) is None:
                continue
            grouped.setdefault(f"{op}:{row['N']}x{row['K']}", []).append(
                (row["M"], {"vendor": ms[vendor], "triton": ms[ours], "dense": ms["bf16 matmul"]}))
    entries = {}
    for key, items in grouped.items():
        items.sort(key=lambda t: t[0])
        entries[key] = {"m": [m for m, _ in items], "best": ["triton" if r["triton"] < r["vendor"] else "vendor"
                                                             for _, r in items],
                        "ms": {p: [round(r[p], 5) for _, r in items] for p in ("vendor", "triton", "dense")}}
    gpu = str(res.get("device", ""))
    return {"version": TABLE_VERSION, "arch": "sm90" if ("H100" in gpu or "H200" in gpu) else "unknown",
            "device": gpu, "torch": res.get("versions", {}).get("torch"),
            "triton": res.get("versions", {}).get("triton"), "date": res.get("date"),
            "seeded_from": "benchmarks.kernels results (no attention entries; tune on the GPU to refresh)",
            "entries": entries}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _triton_version() -> str | None:
    return None if triton is None else triton.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitcompress.kernels.tune", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the table file to write (JSON)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    p.add_argument("--seed-from", type=Path, help="build the table from a benchmarks.kernels JSON instead")
    args = p.parse_args(argv)
    if args.seed_from:
        table = seed_from(args.seed_from)
    else:
        if args.smoke:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        elif not torch.cuda.is_available():
            print("tune: no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
            return 2
        table = measure(torch.device("cpu" if args.smoke else "cuda"), args.repeat, args.smoke)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    read_table(tmp)  # what we wrote must load
    os.replace(tmp, args.out)
    print(f"tune: {len(table['entries'])} entries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

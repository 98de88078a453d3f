"""Kernel speed on the GPU: ``python -m vitcompress.bench.kernels --out results/kernels``.

ViT-B and ViT-L shapes, M = 197 x {1, 8, 64, 256} rows, 577 tokens for attention. Every row is a ratio
against the baseline a user would otherwise run, timed in the same process with CUDA events (median):

- int8 GEMM (fused dequant + bias epilogue) vs bf16 ``torch.matmul`` and vs ``torch._int_mm`` (no dequant);
  fp8 e4m3 GEMM (same epilogue) vs ``torch._scaled_mm`` with row-wise scales (Hopper / Ada);
- block-sparse GEMM (64-blocks, 50 % and 25 % density) vs dense bf16 and torch BSR;
- attention with a key bias vs SDPA with a float mask and vs SDPA flash without a bias; block-sparse
  attention (50 % block density) vs our dense.

``--smoke`` runs tiny shapes through the Triton interpreter on the CPU to check the script (no figures).
"""

# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json, atomic_write_text

GEMMS = {"ViT-B qkv": (768, 2304), "ViT-B fc1": (768, 3072), "ViT-B fc2": (3072, 768),
         "ViT-L fc1": (1024, 4096), "ViT-L fc2": (4096, 1024)}
ROWS = (1, 8, 64, 256)
ATTN = {"ViT-B": (12, 64), "ViT-L": (16, 64)}


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    from .timing import time_callable

    return time_callable(fn, device=device, warmup=5, warmup_s=0.2 if device.type == "cuda" else 0,
                         repeat=repeat).median_ms


def _quant_gemm(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from ..kernels.int8_gemm import int8_gemm, quantize_per_token

    q, s = quantize_per_token(x)
    return int8_gemm(q, w_q, s, w_s, bias)


def gemm_rows(device: torch.device, tokens: int, rows: tuple[int, ...], shapes: dict[str, tuple[int, int]],
              repeat: int) -> list[dict[str, Any]]:
    from ..kernels.fp8_gemm import fp8_gemm, quantize_per_token_fp8_ref, scaled_mm
    from ..kernels.int8_gemm import int8_gemm, quantize_per_token

    out = []
    fp8 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)  # cpu: --smoke only
    for name, (k, n) in shapes.items():
        for r in rows:
            m = tokens * r
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            wt = w.t()
            a_q, a_s = quantize_per_token(x)
            w_s = w.float().abs().amax(1) / 127
            w_q = torch.round(w.float() / w_s[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()
            bias = torch.randn(n, device=device, dtype=torch.bfloat16)
            t = {"bf16 matmul": _time(lambda: x @ wt, device, repeat),
                 "int8 gemm (ours, fused epilogue)": _time(lambda: int8_gemm(a_q, w_q, a_s, w_s, bias), device,
                                                           repeat),
                 "int8 quantize + gemm (ours)": _time(lambda: _quant_gemm(x, w_q, w_s, bias), device, repeat)}
            if device.type == "cuda":
                t["torch._int_mm (no dequant)"] = _time(lambda: torch._int_mm(a_q, w_q), device, repeat)
            if fp8:  # e4m3 with row-wise scales and the bias, ours vs cuBLASLt
                x8, xs8 = quantize_per_token_fp8_ref(x)
                ws8 = w.float().abs().amax(1) / 448
                w8 = (w.float() / ws8[:, None]).to(torch.float8_e4m3fn).t()  # [K, N] column-major
                t["fp8 gemm (ours, fused epilogue)"] = _time(lambda: fp8_gemm(x8, w8, xs8, ws8, bias), device,
                                                             repeat)
                t["fp8 torch._scaled_mm (row-wise)"] = _time(lambda: scaled_mm(x8, w8, xs8, ws8, bias), device,
                                                             repeat)
            out.append({"shape": name, "M": m, "K": k, "N": n, "ms": t})
    return out


def bsr_rows(device: torch.device, tokens: int, rows: tuple[int, ...], shapes: dict[str, tuple[int, int]],
             block: int, repeat: int) -> list[dict[str, Any]]:
    from ..kernels.bsr_gemm import bsr_gemm

    out = []
    for name, (k, n) in shapes.items():
        for density in (0.5, 0.25):
            mask = torch.rand(n // block, k // block, device=device) < density
            w = (torch.randn(n, k, device=device) * mask.repeat_interleave(block, 0).repeat_interleave(block, 1))
            bsr = w.to_sparse_bsr((block, block))
            crow, col, vals = bsr.crow_indices(), bsr.col_indices(), bsr.values().to(torch.bfloat16)
            wb = w.to(torch.bfloat16)
            for r in rows:
                x = torch.randn(tokens * r, k, device=device, dtype=torch.bfloat16)
                t = {"dense bf16": _time(lambda: x @ wb.t(), device, repeat),
                     "bsr gemm (ours)": _time(lambda: bsr_gemm(x, crow, col, vals, None, n), device, repeat)}
                try:
                    tb = torch.sparse_bsr_tensor(crow, col, vals, (n, k))
                    t["torch BSR"] = _time(lambda: (tb @ x.t()).t(), device, repeat)
                except (RuntimeError, NotImplementedError):
                    t["torch BSR"] = None
                out.append({"shape": name, "M": tokens * r, "density": float(mask.float().mean()), "ms": t})
    return out


def attention_rows(device: torch.device, tokens: int, batches: tuple[int, ...], models: dict[str, tuple[int, int]],
                   repeat: int, block: int = 64) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from ..kernels.attention import attention

    out = []
    for name, (h, d) in models.items():
        for b in batches:
            q, k, v = (torch.randn(b, h, tokens, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            bias = torch.rand(b, tokens, device=device).log1p()
            mask = bias[:, None, None, :].to(torch.bfloat16).expand(b, h, tokens, tokens)
            nb = (tokens + block - 1) // block
            blocks = torch.rand(1, 1, nb, nb, device=device) < 0.5
            blocks[..., 0] = True
            t = {"SDPA flash (no bias)": _time(lambda: F.scaled_dot_product_attention(q, k, v), device, repeat),
                 "SDPA + float mask (bias)": _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                   device, repeat),
                 "ours (no bias)": _time(lambda: attention(q, k, v), device, repeat),
                 "ours + key bias": _time(lambda: attention(q, k, v, key_bias=bias), device, repeat),
                 "ours dense, block_size 64": _time(lambda: attention(q, k, v, block_mask=torch.ones_like(blocks),
                                                                      block_size=block), device, repeat),
                 "ours block-sparse 50 %": _time(lambda: attention(q, k, v, block_mask=blocks, block_size=block),
                                                 device, repeat)}
            out.append({"model": name, "batch": b, "tokens": tokens, "block_density": float(blocks.float().mean()),
                        "ms": t})
    return out


def _md_table(rows: list[dict[str, Any]], keys: list[str], base: str) -> list[str]:
    cols = list(rows[0]["ms"])
    lines = ["| " + " | ".join(keys) + " | " + " | ".join(f"{c} ms" for c in cols) + " | "
             + " | ".join(f"{c} vs {base}" for c in cols if c != base) + " |",
             "|" + "---|" * len(keys) + "---:|" * (2 * len(cols) - 1)]
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[c]:.4f}" if ms[c] is not None else "—" for c in cols]
        ratios = [f"**{ms[base] / ms[c]:.2f}x**" if ms[c] else "—" for c in cols if c != base]
        lines.append("| " + " | ".join(str(r[k]) if not isinstance(r[k], float) else f"{r[k]:.2f}" for k in keys)
                     + " | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter (CPU)")
    args = parser.parse_args(argv)
    from ..provenance import run_context

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, tokens, rows, repeat = torch.device("cpu"), 17, (1,), 1
        shapes, attn = {"tiny": (64, 32)}, {"tiny": (2, 16)}
        block = 16
    else:
        if not torch.cuda.is_available():
            print("error: the kernel benchmark needs a CUDA device (use --smoke to check the script)", file=sys.stderr)
            return 2
        device, tokens, rows, repeat, shapes, attn, block = torch.device("cuda"), 197, ROWS, args.repeat, GEMMS, \
            ATTN, 64
    res = {**run_context(device), "repeat": repeat,
           "gemm": gemm_rows(device, tokens, rows, shapes, repeat),
           "bsr": bsr_rows(device, tokens, rows, {k: v for k, v in shapes.items() if "fc" in k or k == "tiny"},
                           block, repeat),
           "attention": attention_rows(device, 577 if not args.smoke else 40, (1, 8, 64) if not args.smoke else (1,),
                                       attn, repeat, block)}
    atomic_write_json(args.out / "kernels.json", res)
    title = "# Kernel smoke run (Triton interpreter on the CPU: these are not speed figures)" if args.smoke \
        else "# Kernel speed"
    lines = [title, "", f"Device: {res['device']}; torch {res['versions']['torch']}, triton "
             f"{res['versions']['triton']}; {res['date']}. CUDA events, median of {repeat} after warm-up; bf16.", "",
             "## int8 / fp8 GEMM (ratio = bf16 matmul time / row time)", ""]
    lines += _md_table(res["gemm"], ["shape", "M", "K", "N"], "bf16 matmul")
    lines += ["", f"## Block-sparse GEMM, {block}x{block} blocks", ""]
    lines += _md_table(res["bsr"], ["shape", "M", "density"], "dense bf16")
    lines += ["", f"## Attention, {res['attention'][0]['tokens']} tokens", ""]
    lines += _md_table(res["attention"], ["model", "batch", "block_density"], "SDPA + float mask (bias)")
    atomic_write_text(args.out / "kernels.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

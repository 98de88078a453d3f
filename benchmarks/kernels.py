"""Kernel speed on the GPU: ``python -m benchmarks.kernels --out results/kernels``.

ViT-B and ViT-L shapes, M = 197 x {1, 8, 64, 256} rows, 577 tokens for attention. Every row is a ratio
against the baseline a user would otherwise run, timed in the same process with CUDA events (median):

- int8 GEMM (fused dequant + bias epilogue) vs bf16 ``torch.matmul`` and vs ``torch._int_mm`` (no dequant);
  fp8 e4m3 GEMM (same epilogue) vs ``torch._scaled_mm`` with row-wise scales (Hopper / Ada);
- block-sparse GEMM (64-blocks, 50 % and 25 % density) vs dense bf16 and torch BSR;
- attention with a key bias vs SDPA with a float mask and vs SDPA flash without a bias; block-sparse
  attention (50 % block density) vs our dense.

Each of our kernels is also checked on the timed inputs: ``sqnr_db`` is its output's SQNR against the exact
computation (fp32 math on the same bf16 inputs, and the same block mask), and a speed target only counts as met
when that SQNR is above the floor in :data:`SQNR_FLOOR_DB`, so a fast but wrong kernel fails.

``--smoke`` runs tiny shapes through the Triton interpreter on the CPU to check the script (no figures).
"""

# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitcompress.bench.timing import time_callable
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.kernels.attention import attention, attention_ref
from vitcompress.kernels.bsr_gemm import bsr_gemm
from vitcompress.kernels.fp8_gemm import fp8_gemm, quantize_per_token_fp8_ref, scaled_mm, scaled_mm_rowwise
from vitcompress.kernels.int8_gemm import int8_gemm, quantize_per_token
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table

GEMMS = {"ViT-B qkv": (768, 2304), "ViT-B fc1": (768, 3072), "ViT-B fc2": (3072, 768),
         "ViT-L fc1": (1024, 4096), "ViT-L fc2": (4096, 1024)}
ROWS = (1, 8, 64, 256)
ATTN = {"ViT-B": (12, 64), "ViT-L": (16, 64)}
INT8, BSR, BIAS, SPARSE = ("int8 gemm (ours, fused epilogue)", "bsr gemm (ours)", "ours + key bias",
                           "ours block-sparse 50 %")
SQNR_FLOOR_DB = {"int8": 30.0, "fp8": 25.0, "bsr": 40.0, "attention": 40.0}
"""Accuracy floors against the exact result: W8A8 quantization error (int8 / fp8, as in the tests), else bf16
rounding of the output (about 50 dB)."""


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) over all elements, in fp32 (inf when equal)."""
    ref, out = ref.float(), out.float()
    noise = (ref - out).pow(2).sum().item()
    return float("inf") if noise == 0 else round(10 * torch.log10(ref.pow(2).sum() / noise).item(), 2)


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:

    return time_callable(fn, device=device, warmup=5, warmup_s=0.2 if device.type == "cuda" else 0,
                         repeat=repeat).median_ms


def _quant_gemm(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:

    q, s = quantize_per_token(x)
    return int8_gemm(q, w_q, s, w_s, bias)


def gemm_rows(device: torch.device, tokens: int, rows: tuple[int, ...], shapes: dict[str, tuple[int, int]],
              repeat: int) -> list[dict[str, Any]]:

    out = []
    fp8 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)  # cpu: --smoke only
    rowwise = scaled_mm_rowwise(str(device))
    for name, (k, n) in shapes.items():
        for r in rows:
            m = tokens * r
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            wt = w.t()
            a_q, a_s = quantize_per_token(x)
            w_s = w.float().abs().amax(1) / 127
            w_q = torch.round(w.float() / w_s[:, None]).clamp(-127, 127).to(torch.int8).t()  # [K,N] column-major
            bias = torch.randn(n, device=device, dtype=torch.bfloat16)
            exact = torch.addmm(bias.float(), x.float(), wt.float())
            acc = {INT8: sqnr_db(exact, int8_gemm(a_q, w_q, a_s, w_s, bias)),
                   "int8 quantize + gemm (ours)": sqnr_db(exact, _quant_gemm(x, w_q, w_s, bias))}
            t = {"bf16 matmul": _time(lambda: x @ wt, device, repeat),
                 INT8: _time(lambda: int8_gemm(a_q, w_q, a_s, w_s, bias), device, repeat),
                 "int8 quantize + gemm (ours)": _time(lambda: _quant_gemm(x, w_q, w_s, bias), device, repeat)}
            if device.type == "cuda":
                t["torch._int_mm (no dequant)"] = _time(lambda: torch._int_mm(a_q, w_q), device, repeat)
            if fp8:  # e4m3 with row-wise scales and the bias, ours vs cuBLASLt
                x8, xs8 = quantize_per_token_fp8_ref(x)
                ws8 = w.float().abs().amax(1) / 448
                w8 = (w.float() / ws8[:, None]).to(torch.float8_e4m3fn).t()  # [K, N] column-major
                acc["fp8 gemm (ours, fused epilogue)"] = sqnr_db(exact, fp8_gemm(x8, w8, xs8, ws8, bias))
                t["fp8 gemm (ours, fused epilogue)"] = _time(lambda: fp8_gemm(x8, w8, xs8, ws8, bias), device,
                                                             repeat)
                t["fp8 torch._scaled_mm (row-wise)"] = _time(lambda: scaled_mm(x8, w8, xs8, ws8, bias), device,
                                                             repeat) if rowwise else None
            out.append({"shape": name, "M": m, "K": k, "N": n, "ms": t, "sqnr_db": acc})
    return out


def _exact_mask(rows: int, cols: int, density: float, device: torch.device, keep_first: bool = False,
                ) -> torch.Tensor:
    """bool [rows, cols]: ``keep_first`` -> exactly round(density x cols) True per row, column 0 among them;
    else exactly round(density x rows x cols) True anywhere (a pruned layer's blocks)."""
    if keep_first:
        score = torch.rand(rows, cols, device=device)
        score[:, 0] = -1.0
        idx = score.argsort(1)[:, :max(1, round(density * cols))]
        return torch.zeros(rows, cols, dtype=torch.bool, device=device).scatter_(1, idx, True)
    keep = torch.randperm(rows * cols, device=device)[:round(density * rows * cols)]
    return torch.zeros(rows * cols, dtype=torch.bool, device=device).index_fill_(0, keep, True).view(rows, cols)


def bsr_rows(device: torch.device, tokens: int, rows: tuple[int, ...], shapes: dict[str, tuple[int, int]],
             block: int, repeat: int) -> list[dict[str, Any]]:

    out = []
    for name, (k, n) in shapes.items():
        for density in (0.5, 0.25):
            mask = _exact_mask(n // block, k // block, density, device)
            w = (torch.randn(n, k, device=device) * mask.repeat_interleave(block, 0).repeat_interleave(block, 1))
            bsr = w.to_sparse_bsr((block, block))
            crow, col, vals = bsr.crow_indices(), bsr.col_indices(), bsr.values().to(torch.bfloat16)
            wb = w.to(torch.bfloat16)
            for r in rows:
                x = torch.randn(tokens * r, k, device=device, dtype=torch.bfloat16)
                acc = {BSR: sqnr_db(x.float() @ wb.float().t(), bsr_gemm(x, crow, col, vals, None, n))}
                t = {"dense bf16": _time(lambda: x @ wb.t(), device, repeat),
                     BSR: _time(lambda: bsr_gemm(x, crow, col, vals, None, n), device, repeat)}
                try:  # fewer repeats: torch's BSR kernels can be orders of magnitude slower
                    tb = torch.sparse_bsr_tensor(crow, col, vals, (n, k))
                    t["torch BSR"] = _time(lambda: (tb @ x.t()).t(), device, min(repeat, 10))
                except (RuntimeError, NotImplementedError):
                    t["torch BSR"] = None
                out.append({"shape": name, "M": tokens * r, "density": float(mask.float().mean()), "ms": t,
                            "sqnr_db": acc})
    return out


def attention_rows(device: torch.device, tokens: int, batches: tuple[int, ...], models: dict[str, tuple[int, int]],
                   repeat: int, block: int = 64) -> list[dict[str, Any]]:

    out = []
    for name, (h, d) in models.items():
        for b in batches:
            q, k, v = (torch.randn(b, h, tokens, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            bias = torch.rand(b, tokens, device=device).log1p()
            mask = bias[:, None, None, :].to(torch.bfloat16).expand(b, h, tokens, tokens)
            nb = (tokens + block - 1) // block
            blocks = _exact_mask(nb, nb, 0.5, device, keep_first=True)[None, None]  # half of each query row
            qf, kf, vf = q.float(), k.float(), v.float()
            exact = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=bias[:, None, None, :])
            acc = {"ours (no bias)": sqnr_db(F.scaled_dot_product_attention(qf, kf, vf), attention(q, k, v)),
                   BIAS: sqnr_db(exact, attention(q, k, v, key_bias=bias)),
                   SPARSE: sqnr_db(attention_ref(qf, kf, vf, block_mask=blocks, block_size=block),
                                   attention(q, k, v, block_mask=blocks, block_size=block))}
            t = {"SDPA flash (no bias)": _time(lambda: F.scaled_dot_product_attention(q, k, v), device, repeat),
                 "SDPA + float mask (bias)": _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                   device, repeat),
                 "ours (no bias)": _time(lambda: attention(q, k, v), device, repeat),
                 BIAS: _time(lambda: attention(q, k, v, key_bias=bias), device, repeat),
                 "ours dense (all blocks on)": _time(lambda: attention(q, k, v, block_mask=torch.ones_like(blocks),
                                                                      block_size=block), device, repeat),
                 SPARSE: _time(lambda: attention(q, k, v, block_mask=blocks, block_size=block), device, repeat)}
            out.append({"model": name, "batch": b, "tokens": tokens, "block_density": float(blocks.float().mean()),
                        "ms": t, "sqnr_db": acc})
    return out


def _md_table(rows: list[dict[str, Any]], keys: list[str], base: str) -> list[str]:
    cols = list(rows[0]["ms"])
    header = [*keys, *(f"{c} ms" for c in cols), *(f"{c} vs {base}" for c in cols if c != base),
              "SQNR dB: " + ", ".join(rows[0]["sqnr_db"])]
    body = []
    for r in rows:
        ms = r["ms"]
        body.append([*(r[k] for k in keys), *(None if ms[c] is None else f"{ms[c]:.4f}" for c in cols),
                     *(f"**{ms[base] / ms[c]:.2f}x**" if ms[c] else None for c in cols if c != base),
                     " / ".join(f"{v:.1f}" for v in r["sqnr_db"].values())])
    return [markdown_table(header, body, align="l" * len(keys) + "r" * (2 * len(cols)))]


def _ratio(ms: dict[str, float | None], slow: str, fast: str) -> float | None:
    """time(slow) / time(fast): > 1 means ``fast`` is faster."""
    return ms[slow] / ms[fast] if ms.get(slow) and ms.get(fast) else None


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #6's speed criteria, each as a measured ratio against its floor (at the largest M measured)."""
    out: list[dict[str, Any]] = []

    def add(what: str, ratio: float | None, floor: float, row: dict[str, Any], col: str, kind: str) -> None:
        sqnr = row["sqnr_db"][col]
        out.append({"target": what, "ratio": None if ratio is None else round(ratio, 3), "floor": floor,
                    "sqnr_db": sqnr, "sqnr_floor_db": SQNR_FLOOR_DB[kind],
                    "met": None if ratio is None else bool(ratio >= floor and sqnr >= SQNR_FLOOR_DB[kind])})

    gemm = [r for r in res.get("gemm", []) if r["shape"] in ("ViT-B fc1", "ViT-B fc2", "tiny")]
    for r in (r for r in gemm if r["M"] == max(g["M"] for g in gemm)):
        where = f"{r['shape']}, M = {r['M']}"
        add(f"int8 GEMM vs bf16 matmul, {where}", _ratio(r["ms"], "bf16 matmul", INT8), 1.6, r, INT8, "int8")
        add(f"int8 GEMM vs torch._int_mm (no dequant), {where}", _ratio(r["ms"], "torch._int_mm (no dequant)", INT8),
            0.95, r, INT8, "int8")
    for r in res.get("attention", []):
        where = f"{r['model']}, batch {r['batch']}, {r['tokens']} tokens"
        add(f"attention + key bias vs SDPA + float mask, {where}", _ratio(r["ms"], "SDPA + float mask (bias)", BIAS),
            1.5, r, BIAS, "attention")
        add(f"attention + key bias vs SDPA flash without bias, {where}", _ratio(r["ms"], "SDPA flash (no bias)", BIAS),
            0.85, r, BIAS, "attention")
        add(f"block-sparse attention ({r['block_density']:.0%} of blocks) vs our dense, {where}",
            _ratio(r["ms"], "ours dense (all blocks on)", SPARSE), 1.6, r, SPARSE, "attention")
    bsr = res.get("bsr", [])
    for r in (r for r in bsr if r["M"] == max(b["M"] for b in bsr)):
        add(f"bsr GEMM {res['block']}-blocks at {r['density']:.0%} density vs dense bf16, {r['shape']}, M = {r['M']}",
            _ratio(r["ms"], "dense bf16", BSR), 1.5 if r["density"] > 0.3 else 2.5, r, BSR, "bsr")
    return out


def markdown(res: dict[str, Any]) -> str:
    """The tables of whichever parts ``res`` holds, then the targets."""
    title = "# Kernel smoke run (Triton interpreter on the CPU: these are not speed figures)" if res["smoke"] \
        else "# Kernel speed"
    lines = [title, "", f"Device: {res['device']}; torch {res['versions']['torch']}, triton "
             f"{res['versions']['triton']}; {res['date']}. CUDA events, median of {res['repeat']} after warm-up "
             "(torch BSR: 10); bf16. Ratios: the baseline's time / the row's (> 1: faster than the baseline)."]
    if res.get("gemm"):
        lines += ["", "## int8 / fp8 GEMM (ratio = bf16 matmul time / row time)", ""]
        lines += _md_table(res["gemm"], ["shape", "M", "K", "N"], "bf16 matmul")
    if res.get("bsr"):
        lines += ["", f"## Block-sparse GEMM, {res['block']}x{res['block']} blocks", ""]
        lines += _md_table(res["bsr"], ["shape", "M", "density"], "dense bf16")
    if res.get("attention"):
        lines += ["", f"## Attention, {res['attention'][0]['tokens']} tokens (block mask: {res['block']}-blocks)", ""]
        lines += _md_table(res["attention"], ["model", "batch", "block_density"], "SDPA + float mask (bias)")
    lines += ["", "## Targets (issue #6: the speed floor, with our output's SQNR above its floor)", "",
              markdown_table(["target", "measured", "floor", "SQNR (dB)", "SQNR floor", "met"],
                             [[t["target"], None if t["ratio"] is None else f"{t['ratio']:.2f}x", f"{t['floor']}x",
                               f"{t['sqnr_db']:.1f}", f"{t['sqnr_floor_db']:.0f}",
                               None if t["met"] is None else ("yes" if t["met"] else "**no**")]
                              for t in targets(res)], align="lrrrrl")]
    return "\n".join(lines) + "\n"


PARTS = ("gemm", "bsr", "attention")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="no timing: merge the parts of earlier runs' kernels.json (same device) into --out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter (CPU)")
    args = parser.parse_args(argv)

    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        if len({r["device"] for r in runs}) != 1:
            print("error: --merge takes runs from one device", file=sys.stderr)
            return 2
        res = {k: v for r in runs for k, v in r.items()}
        return _write(args.out, res)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        print(f"error: --parts takes a subset of {', '.join(PARTS)}, got '{args.parts}'", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, tokens, rows, repeat = torch.device("cpu"), 17, (1,), 1
        shapes, attn, attn_tokens, batches, block = {"tiny": (64, 32)}, {"tiny": (2, 16)}, 40, (1,), 16
    else:
        if not torch.cuda.is_available():
            print("error: the kernel benchmark needs a CUDA device (use --smoke to check the script)", file=sys.stderr)
            return 2
        device, tokens, rows, repeat = torch.device("cuda"), 197, ROWS, args.repeat
        shapes, attn, attn_tokens, batches, block = GEMMS, ATTN, 577, (1, 8, 64), 64
    res: dict[str, Any] = {**run_context(device), "repeat": repeat, "block": block, "smoke": args.smoke}
    for part in parts:  # written after each part: a run cut short keeps what it finished
        if part == "gemm":
            res["gemm"] = gemm_rows(device, tokens, rows, shapes, repeat)
        elif part == "bsr":
            res["bsr"] = bsr_rows(device, tokens, rows, {k: v for k, v in shapes.items() if "fc" in k or k == "tiny"},
                                  block, repeat)
        else:
            res["attention"] = attention_rows(device, attn_tokens, batches, attn, repeat, block)
        _write(args.out, res)
    print(f"wrote {args.out / 'kernels.md'}")
    return 0


def _write(out: Path, res: dict[str, Any]) -> int:
    atomic_write_json(out / "kernels.json", res)
    atomic_write_text(out / "kernels.md", markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Symmetric against asymmetric activation grids for W8A8 on a real model: how far each moves the logits.

    python -m benchmarks.activation_grids --model ARTIFACT --data ../shared/data/cifar10 \
        --out results/dinov2s/activation_grids

Every qkv / proj / fc1 / fc2 input of the blocks is fake-quantized to 8 bits, with the weights on their 8-bit (or
7-bit, as a CPU without VNNI multiplies them) per-channel grid, four ways: static per tensor (ranges from
``--calib-size`` train images) or per token, each on a grid symmetric about 0 (+-127, what the deploy path ran before
``QuantConfig`` v7) or over the range (uint8 with a zero point). Reported on ``--images`` evenly spaced test images:
the relative L2 error of the logits against the float model, and top-1 agreement with it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.data import load_data
from vitcompress.models import data_config
from vitcompress.pipeline import create_model
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results

ALIASES = ("qkv", "proj", "fc1", "fc2")


def grid(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """x fake-quantized to 8 bits on [lo, hi] (broadcast against x): +-127 about 0, or uint8 with a zero point."""
    if symmetric:
        s = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8) / 127
        return (x / s).round().clamp(-127, 127) * s
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = (hi - lo).clamp_min(1e-8) / 255
    z = (-lo / s).round()
    return ((x / s).round() + z).clamp(0, 255).sub(z) * s


def quantized(base: nn.Module, layers: dict[str, tuple[float, float]], per_token: bool, symmetric: bool,
              w_bits: int) -> nn.Module:
    """A copy of ``base`` with its layers' weights on the per-channel grid and inputs fake-quantized."""
    m = copy.deepcopy(base)
    q = 2 ** (w_bits - 1) - 1
    for name, mod in m.named_modules():
        if name not in layers:
            continue
        w = mod.weight.data
        s = w.abs().amax(1, keepdim=True) / q
        mod.weight.data = (w / s).round().clamp(-q, q) * s
        lo, hi = layers[name]

        def fake(x: torch.Tensor, lo: float = lo, hi: float = hi) -> torch.Tensor:
            if per_token:
                return grid(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), symmetric)
            return grid(x, torch.tensor(lo), torch.tensor(hi), symmetric)

        mod.register_forward_pre_hook(lambda _m, args, f=fake: (f(args[0]),))
    return m


def ranges(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, tuple[float, float]]:
    seen: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append((float(args[0].min()), float(args[0].max())))) for n in names]
    with torch.inference_mode():
        model(images)
    for h in hooks:
        h.remove()
    return {n: (min(a for a, _ in v), max(b for _, b in v)) for n, v in seen.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an artifact (e.g. the dinov2s_cifar10 baseline)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    base = create_model(args.model).eval()
    dc = data_config(base)
    calib = torch.cat([b[0] for b in load_data(args.data, dc, limit=args.calib_size, purpose="calib").loader(32)])
    x = torch.cat([b[0] for b in load_data(args.data, dc, limit=args.images, split="test").loader(64)])
    names = [n for n, _ in base.named_modules() if n.startswith("blocks") and n.split(".")[-1] in ALIASES]
    rng = ranges(base, names, calib)
    with torch.inference_mode():
        ref = base(x)
    rows: list[dict[str, Any]] = []
    for per_token in (False, True):
        for w_bits in (8, 7):
            for symmetric in (True, False):
                with torch.inference_mode():
                    out = quantized(base, rng, per_token, symmetric, w_bits)(x)
                rows.append({"activations": "per token" if per_token else "static per tensor",
                             "grid": "symmetric (+-127)" if symmetric else "asymmetric (uint8, zero point)",
                             "weight_bits": w_bits,
                             "logit_rel_l2_%": round(float((out - ref).norm() / ref.norm()) * 100, 2),
                             "agreement_%": round(float((out.argmax(-1) == ref.argmax(-1)).float().mean()) * 100, 1)})
                print(rows[-1], file=sys.stderr)
    cmd = "python -m benchmarks.activation_grids " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"what": __doc__.splitlines()[0], "command": cmd, **run_context(torch.device("cpu")), "dtype": "fp32",
           "images": args.images, "calib_size": args.calib_size, "rows": rows}
    cols = ["activations", "grid", "weight_bits", "logit_rel_l2_%", "agreement_%"]
    md = "\n".join([f"# {res['what']}", "", f"{args.model}; {args.images} evenly spaced test images, ranges from "
                    f"{args.calib_size} train images; {res['device']}; {res['date']}. Command: `{cmd}`.", "",
                    markdown_table(cols, [[r[c] for c in cols] for r in rows])])
    write_results(args.out, "activation_grids", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

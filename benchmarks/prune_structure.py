"""Why heads 25 % + MLP 50 % collapses a real pretrained ViT without recovery, and what the output criterion and the
least-squares refit change: per block, what each criterion keeps, the LayerScale gains, and the stream error.

    python -m benchmarks.prune_structure --model ARTIFACT --data ../shared/data/cifar10 \
        --out results/dinov2s/prune_structure

For ``magnitude`` and ``output`` (:mod:`vitcompress.transforms.prune.importance`), each with the refit
(:mod:`vitcompress.transforms.prune.refit`): the heads and MLP channels each block keeps, and the relative error of
the last block's output (||X_pruned - X_dense|| / ||X_dense||, after the final norm) on the calibration images,
before and after the refit. Beside them, each block's mean |gamma| of LayerScale (ls1, ls2) and its stream's RMS.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

from vitcompress.models import model_info
from vitcompress.pipeline import Calibration, apply_stack, calibration_batches, create_model
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results
from vitcompress.transforms.layers import layer_scale, token_stream

CRITERIA = ("magnitude", "output")


def stream_rms(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """The residual stream's RMS after each block on ``images`` [B,3,H,W]."""
    out = []
    with torch.no_grad():
        x = token_stream(model, images)
        for blk in model.blocks:
            x = blk(x)
            out.append(round(float(x.pow(2).mean().sqrt()), 3))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an artifact (e.g. the dinov2s_cifar10 baseline)")
    ap.add_argument("--data", required=True, help="the data the model was fitted on (train split: calibration)")
    ap.add_argument("--heads", type=float, default=0.25)
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = create_model(args.model).eval()
    calib = Calibration(args.data, args.calib_size)
    states: dict[str, dict[str, Any]] = {}
    for crit in CRITERIA:
        m = apply_stack(copy.deepcopy(base), [{"name": "prune", "heads": args.heads, "mlp": args.mlp,
                                               "criterion": crit, "calib_size": args.calib_size, "refit": True,
                                               "refit_size": args.calib_size}], calib=calib)
        states[crit] = model_info(m).transforms[-1]["state"]
    images = torch.cat([b[0] for _, b in zip(range(2), calibration_batches(copy.deepcopy(base), calib, 32))])
    rms = stream_rms(base, images)
    rows = []
    for i, blk in enumerate(base.blocks):
        g1, g2 = (float(g.abs().mean()) if (g := layer_scale(blk, n)) is not None else 1.0 for n in ("ls1", "ls2"))
        rows.append([i, round(g1, 4), round(g2, 4), rms[i],
                     *[v for c in CRITERIA for v in (states[c]["heads"][i], states[c]["mlp"][i])]])
    heads0, mlp0 = base.blocks[0].attn.num_heads, base.blocks[0].mlp.fc1.out_features
    cmd = "python -m benchmarks.prune_structure " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {**run_context(torch.device("cpu")), "model": args.model, "command": cmd, "heads": args.heads,
           "mlp": args.mlp, "calib_size": args.calib_size,
           "criteria": {c: {k: states[c][k] for k in ("heads", "mlp", "stream_error_before", "stream_error_after",
                                                     "params_fraction")} for c in CRITERIA},
           "ls_gamma_mean": [[r[1], r[2]] for r in rows], "stream_rms": rms}
    errors = [[c, states[c]["params_fraction"], states[c]["stream_error_before"], states[c]["stream_error_after"]]
              for c in CRITERIA]
    md = [f"# Heads {args.heads:.0%} + MLP {args.mlp:.0%} on {Path(args.model).name}: what each criterion keeps", "",
          f"`{cmd}` ({res['date']}; {res['device']}). Calibration: {args.calib_size} train images.", "",
          f"Per block (of {heads0} heads and {mlp0} MLP channels): LayerScale's mean abs(gamma), the residual stream's "
          "RMS after the block, and the heads / MLP channels each criterion keeps (a global ranking).", "",
          markdown_table(["block", "ls1 mean abs(gamma)", "ls2 mean abs(gamma)", "stream RMS",
                          *[f"{c}: {k}" for c in CRITERIA for k in ("heads", "MLP")]], rows), "",
          "The last block's output error on the calibration images (relative L2, after the final norm):", "",
          markdown_table(["criterion", "parameters kept", "pruned", "pruned + refit"], errors), ""]
    write_results(args.out, "prune_structure", res, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

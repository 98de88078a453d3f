"""What quantization meets in a real pretrained ViT: activation ranges, outlier channels, high-norm tokens, and which
layers' quantization error moves the logits.

    python -m benchmarks.real_activations --model ARTIFACT --data ../shared/data/cifar10 \
        --out results/dinov2s/activations

Three tables, all on held-out train images (``heldout:N:DATA``; calibration on the usual evenly spaced train images):
- **the residual stream per block**: the largest |x|, the median and largest token norm, and the high-norm tokens
  (norm > 4x the image's median patch-token norm: the artefact tokens DINOv2 is known for);
- **each Linear's input**: its absmax, how far its widest channel sticks out (max / median channel absmax), and the
  layer's own relative output error ||XW^T - Q(X)Q(W)^T|| / ||XW^T|| under W8A8 static (per-tensor, calibrated
  min-max), W8A8 per-token, W8A8 per-token after SmoothQuant (alpha 0.5), W6A6 static and W4 weights alone;
- **end to end**: the relative L2 change of the logits and the agreement when only one kind of layer (qkv, proj, fc1,
  fc2) or all of them are quantized, through the real transform (:func:`vitcompress.pipeline.apply_stack`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.data import load_data
from vitcompress.evaluate import forward
from vitcompress.models import data_config
from vitcompress.pipeline import Calibration, apply_stack, create_model
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results
from vitcompress.transforms.quantize import ops

KINDS = ("qkv", "proj", "fc1", "fc2")
HIGH_NORM = 4.0  # a token whose norm is this many times the image's median patch-token norm

# end-to-end configurations: (label, QuantConfig fields); each is run on every kind of layer alone and on all of them
END_TO_END: list[tuple[str, dict[str, Any]]] = [
    ("W8A8 static", {}),
    ("W8A8 per-token", {"a_granularity": "per_token"}),
    ("A8 static (float weights)", {"w_bits": None}),
    ("W4 (RTN, float activations)", {"w_bits": 4, "a_bits": None}),
    ("W6A6 static", {"w_bits": 6, "a_bits": 6}),
]
ALL_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("W8A8 static + SmoothQuant", {"reparam": "smoothquant"}),
    ("W8A8 per-token + SmoothQuant", {"a_granularity": "per_token", "reparam": "smoothquant"}),
    ("W6A6 static + SmoothQuant", {"w_bits": 6, "a_bits": 6, "reparam": "smoothquant"}),
    ("W6A6 static + RepQ", {"w_bits": 6, "a_bits": 6, "reparam": "repq"}),
]


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
            and n.rsplit(".", 1)[-1] in KINDS]


def _images(data: Any, batch: int) -> list[torch.Tensor]:
    return [x for x, _, _ in data.loader(batch)]


def input_ranges(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per Linear: the input's per-channel absmax [C] and global min / max over the calibration images."""
    out: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            r = out.setdefault(name, {"chan": torch.zeros(x.shape[1]), "lo": torch.tensor(0.0),
                                      "hi": torch.tensor(0.0)})
            r["chan"] = torch.maximum(r["chan"], x.abs().amax(0))
            r["lo"], r["hi"] = torch.minimum(r["lo"], x.min()), torch.maximum(r["hi"], x.max())
        return fn

    _run_hooked(model, batches, [m.register_forward_pre_hook(hook(n)) for n, m in _linears(model)])
    return out


def _run_hooked(model: nn.Module, batches: list[torch.Tensor], handles: list[Any]) -> None:
    """Run ``batches`` through ``model`` with hooks ``handles`` registered, then remove them."""
    try:
        with torch.inference_mode():
            for x in batches:
                forward(model, x)
    finally:
        for h in handles:
            h.remove()


def _static(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    scale, zero = ops.act_qparams(lo.reshape(1), hi.reshape(1), bits)
    return ops.fake_quant_act(x, scale, zero, bits)


def local_errors(x: torch.Tensor, w: torch.Tensor, calib: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(squared error, squared reference) of x [T,C] @ w[O,C]^T under each quantization, for one batch."""
    ref = x @ w.T
    lo, hi = calib["lo"], calib["hi"]
    s = (calib["chan"].clamp_min(1e-5).sqrt() / w.abs().amax(0).clamp_min(1e-5).sqrt()).clamp(1e-4, 1e4)  # alpha 0.5
    cases = {
        "W8A8 static": _static(x, lo, hi, 8) @ ops.fake_quant_weight(w, 8).T,
        "W8A8 per-token": ops.fake_quant_act_per_token(x, 8) @ ops.fake_quant_weight(w, 8).T,
        "W8A8 per-token + SmoothQuant": ops.fake_quant_act_per_token(x / s, 8) @ ops.fake_quant_weight(w * s, 8).T,
        "W6A6 static": _static(x, lo, hi, 6) @ ops.fake_quant_weight(w, 6).T,
        "W4 weights": x @ ops.fake_quant_weight(w, 4).T,
    }
    ref2 = float(ref.pow(2).sum())
    return {k: (float((v - ref).pow(2).sum()), ref2) for k, v in cases.items()}


def per_layer(model: nn.Module, batches: list[torch.Tensor], calib: dict[str, dict[str, torch.Tensor]],
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-Linear table and the per-block residual-stream table, over the measurement images."""
    layers = _linears(model)
    err: dict[str, dict[str, list[float]]] = {n: {} for n, _ in layers}
    stream: dict[int, dict[str, list[float]]] = {i: {"absmax": [], "median": [], "max": [], "high": [],
                                                     "cls": []} for i in range(len(model.blocks))}

    def lin_hook(name: str, w: torch.Tensor):
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            for k, (e, r) in local_errors(x, w, calib[name]).items():
                acc = err[name].setdefault(k, [0.0, 0.0])
                acc[0] += e
                acc[1] += r
        return fn

    def block_hook(i: int, prefix: int):
        def fn(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            norms = out.detach().float().norm(dim=-1)  # [B,N]
            med = norms[:, prefix:].median(dim=1).values  # [B]
            s = stream[i]
            s["absmax"].append(float(out.abs().max()))
            s["median"].append(float(med.median()))
            s["max"].append(float(norms[:, prefix:].max()))
            s["high"].append(float((norms[:, prefix:] > HIGH_NORM * med[:, None]).sum(1).float().mean()))
            s["cls"].append(float(norms[:, 0].median()))
        return fn

    prefix = int(model.num_prefix_tokens)
    handles = [m.register_forward_pre_hook(lin_hook(n, m.weight.detach().float())) for n, m in layers]
    _run_hooked(model, batches, handles + [b.register_forward_hook(block_hook(i, prefix))
                                           for i, b in enumerate(model.blocks)])
    rows = []
    for name, _ in layers:
        chan = calib[name]["chan"]
        rows.append({"layer": name, "absmax": round(float(chan.max()), 2),
                     "outlier_ratio": round(float(chan.max() / chan.median().clamp_min(1e-6)), 1),
                     **{k: round(100 * (e / max(r, 1e-12)) ** 0.5, 3) for k, (e, r) in err[name].items()}})
    blocks = [{"block": i, "residual_absmax": round(max(s["absmax"]), 1),
               "median_token_norm": round(statistics.median(s["median"]), 2),
               "max_token_norm": round(max(s["max"]), 1), "cls_norm": round(statistics.median(s["cls"]), 1),
               "high_norm_tokens_per_image": round(statistics.mean(s["high"]), 2)} for i, s in stream.items()]
    return rows, blocks


def end_to_end(model: nn.Module, batches: list[torch.Tensor], data: str, calib_size: int,
               ) -> list[dict[str, Any]]:
    """Logit change and agreement when one kind of layer (or all) is quantized by the real transform."""
    with torch.inference_mode():
        ref = torch.cat([forward(model, x) for x in batches]).float()
    runs = [(label, kind, f) for label, f in END_TO_END for kind in (*KINDS, "all")]
    runs += [(label, "all", f) for label, f in ALL_ONLY]
    rows = []
    for label, kind, fields in runs:
        cfg = {"name": "quantize", "calib_size": calib_size, **fields,
               "layers": list(KINDS) if kind == "all" else [kind]}
        q = apply_stack(copy.deepcopy(model), [cfg], calib=Calibration(data, calib_size))
        with torch.inference_mode():
            out = torch.cat([forward(q, x) for x in batches]).float()
        rows.append({"quantization": label, "layers": kind,
                     "logit_rel_l2_%": round(100 * float((out - ref).norm() / ref.norm()), 2),
                     "agreement_%": round(100 * float((out.argmax(1) == ref.argmax(1)).float().mean()), 2)})
        print(f"{label:32s} {kind:5s} logits {rows[-1]['logit_rel_l2_%']:6.2f} % agreement "
              f"{rows[-1]['agreement_%']:6.2f} %", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an artifact (e.g. the dinov2s_cifar10 baseline)")
    ap.add_argument("--data", required=True, help="the data the model was fitted on (train split used)")
    ap.add_argument("--images", type=int, default=64, help="held-out train images to measure on")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = create_model(args.model)
    dcfg = data_config(model)
    calib = _images(load_data(args.data, dcfg, limit=args.calib_size, purpose="calib"), 16)
    measure = _images(load_data(f"heldout:{args.images}:{args.data}", dcfg, purpose="train"), 16)
    ranges = input_ranges(model, calib)
    rows, blocks = per_layer(model, measure, ranges)
    e2e = end_to_end(model, measure, args.data, args.calib_size)
    res = {**run_context(torch.device("cpu")), "model": args.model, "images": args.images,
           "calib_size": args.calib_size, "command": "python -m benchmarks.real_activations " + " ".join(
               argv if argv is not None else __import__("sys").argv[1:]),
           "blocks": blocks, "layers": rows, "end_to_end": e2e}
    local = list(rows[0])[3:]
    md = [f"# Real activations: {Path(args.model).name}", "",
          f"{args.images} held-out train images; calibration on {args.calib_size} train images. "
          f"`{res['command']}` ({res['date']}).", "",
          "## The residual stream after each block", "",
          markdown_table(list(blocks[0]), [list(b.values()) for b in blocks]), "",
          f"High-norm tokens: patch tokens with a norm above {HIGH_NORM:g}x the image's median patch-token norm.",
          "", "## Each Linear's input, and its own relative output error (%)", "",
          markdown_table(["layer", "input absmax", "max / median channel", *local],
                         [[r["layer"], r["absmax"], r["outlier_ratio"], *[r[k] for k in local]] for r in rows]), "",
          "## End to end: only these layers quantized (the real transform)", "",
          markdown_table(list(e2e[0]), [list(r.values()) for r in e2e])]
    write_results(args.out, "activations", res, "\n".join(md))


if __name__ == "__main__":
    main()

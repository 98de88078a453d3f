"""Quantization, measured: ``python -m vitcompress.bench.quant ARTIFACT --out results/quant [--speed]``.

Accuracy: every variant is calibrated on 32 train-split images and compared with the float model on digits
and digits-c. Simulate-mode points are accuracy-only (they run in floating point); deploy points run int8.
Speed (``--speed``): W8A8 deploy vs the bf16 + SDPA baseline on vit_base_patch16_224, timed alternately.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_write_json, atomic_write_text

VARIANTS: dict[str, dict[str, Any]] = {
    "W8A8 deploy (int8 GEMM), per-token acts": {"mode": "deploy", "a_granularity": "per_token"},
    "W8A8 deploy (int8 GEMM), static acts": {"mode": "deploy"},
    "W8A8 minmax": {"w_bits": 8, "a_bits": 8},
    "W6A6 minmax": {"w_bits": 6, "a_bits": 6},
    "W6A6 mse": {"w_bits": 6, "a_bits": 6, "observer": "mse"},
    "W6A6 repq": {"w_bits": 6, "a_bits": 6, "reparam": "repq"},
    "W4A8 minmax": {"w_bits": 4, "a_bits": 8},
    "W4A8 mse": {"w_bits": 4, "a_bits": 8, "observer": "mse"},
    "W4A8 gptq": {"w_bits": 4, "a_bits": 8, "rounding": "gptq"},
    "W3A8 minmax": {"w_bits": 3, "a_bits": 8},
    "W3A8 gptq": {"w_bits": 3, "a_bits": 8, "rounding": "gptq"},
    "W4A4 minmax": {"w_bits": 4, "a_bits": 4},
    "W4A4 percentile": {"w_bits": 4, "a_bits": 4, "observer": "percentile"},
    "W4A4 mse": {"w_bits": 4, "a_bits": 4, "observer": "mse"},
    "W4A4 repq": {"w_bits": 4, "a_bits": 4, "reparam": "repq"},
    "W4A4 repq + gptq": {"w_bits": 4, "a_bits": 4, "reparam": "repq", "rounding": "gptq"},
    "W4A4 minmax, per-token acts": {"w_bits": 4, "a_bits": 4, "a_granularity": "per_token"},
    "W4 (group 32) A16": {"w_bits": 4, "a_bits": None, "w_granularity": "per_group", "group_size": 32},
}


def _details(model: nn.Module) -> str:
    c = model.vitcompress_info.transforms[-1]["config"]
    if c["mode"] == "deploy":
        return f"W8 per_channel, A8 {c['a_granularity']} symmetric, int8 execution (deployable)"
    w = f"W{c['w_bits'] or 16} {c['w_granularity']}" + (f"/{c['group_size']}" if c["w_granularity"] == "per_group"
                                                         else "")
    a = f"A{c['a_bits']} {c['a_granularity']}" if c["a_bits"] else "A16"
    how = ("repq + " if c.get("reparam") == "repq" else "") + ("gptq" if c.get("rounding") == "gptq"
                                                                 else c["observer"])
    return f"{w}, {a}, {how}, simulate"


def speed(out: Path, batch_sizes: list[int], arch: str = "vit_base_patch16_224", repeat: int = 7) -> None:
    """W8A8 deploy (per-token, int8 GEMM) vs the dense bf16 + SDPA model, alternately in one process."""
    from ..bench import BenchConfig, compare, model_runner
    from ..methods import QuantConfig
    from ..models import create_model, data_config
    from ..provenance import run_context
    from ..transforms import compress_

    base = create_model(arch)
    q = copy.deepcopy(base)
    compress_(q, QuantConfig(mode="deploy", a_granularity="per_token"))
    size, cfg = data_config(base)["input_size"], BenchConfig()
    device = cfg.resolve_device()
    rows = []
    for bs in batch_sizes:
        r = compare(model_runner(base, bs, size, cfg), model_runner(q, bs, size, cfg), device=device,
                    warmup=2, warmup_s=2.0, repeat=repeat)
        rows.append({"batch": bs, "speedup": round(r["speedup"], 3), "bf16_ms": round(r["a_median_ms"], 2),
                     "int8_ms": round(r["b_median_ms"], 2)})
        print(f"W8A8 deploy vs bf16, batch {bs}: {r['speedup']:.3f}x", flush=True)
    res = {"arch": arch, **run_context(device), "repeat": repeat, "rows": rows}
    atomic_write_json(out / "speed_w8a8_vs_bf16.json", res)
    lines = [f"# W8A8 deploy (int8 GEMM via torch._int_mm) vs bf16 + SDPA: {arch}", "",
             f"Device: {res['device']}; torch {res['versions']['torch']}; {res['date']}. Both timed alternately "
             f"in one process, median of {repeat}. Speedup > 1 means int8 is faster.", "",
             "| batch | speedup | bf16 ms | int8 ms |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | **{r['speedup']:.2f}x** | {r['bf16_ms']} | {r['int8_ms']} |" for r in rows]
    atomic_write_text(out / "speed_w8a8_vs_bf16.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--speed", action="store_true", help="also time W8A8 deploy vs bf16 on ViT-B/16")
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args(argv)
    if args.speed:
        speed(args.out, [int(b) for b in args.batch_sizes.split(",")])

    from ..data import load_data
    from ..methods import QuantConfig
    from ..models import data_config
    from ..transforms import compress_
    from .accuracy import accuracy_markdown, accuracy_table

    def build(spec: dict[str, Any]):
        def fn(base: nn.Module) -> nn.Module:
            model = copy.deepcopy(base)
            calib = load_data("digits", data_config(model), purpose="calib", limit=args.calib_size)
            compress_(model, QuantConfig(**spec, calib_size=args.calib_size), calib=calib.loader(args.calib_size))
            return model
        return fn

    res = accuracy_table(args.artifact, {k: build(v) for k, v in VARIANTS.items()}, details=_details)
    atomic_write_json(args.out / "accuracy_digits.json", res)
    atomic_write_text(args.out / "accuracy_digits.md", accuracy_markdown(
        res, "Post-training quantization accuracy (simulate mode): the digits testbed", "quantizer",
        f" Calibration: {args.calib_size} images of the digits train split. Simulated points are accuracy-only; "
        "size is that of the simulated (float) artifact."))
    print(f"wrote {args.out / 'accuracy_digits'}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantization, measured: ``python -m benchmarks.quant ARTIFACT --out results/quant [--speed]``.

Accuracy: every variant is calibrated on 32 train-split images and compared with the float model on digits
and digits-c, in one table with its size and, for deployable points, its latency against the bf16 + SDPA
model (same process, alternating). Simulated points are accuracy-only: they run in floating point.
Speed (``--speed``): every deployed format vs the fastest dense dtype + SDPA on vit_base_patch16_224 (``--arch``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from torch import nn

from vitcompress import Calibration, apply_stack, create_model
from vitcompress.bench import BenchConfig, compare, model_runner
from vitcompress.bench.measure import serialized_size_mb
from vitcompress.errors import ConfigError
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.models import data_config, model_info
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table
from vitcompress.transforms.quantize import int8_linear

from . import variants
from .accuracy import accuracy_table

RECIPE = variants.load("quant")  # accuracy (target -> variant -> stack) and speed: benchmarks/recipes/quant.yaml


def _details(c: dict[str, Any]) -> str:
    """A row's quantizer, from its QuantConfig dict."""
    if c["backend"] == "bnb":
        return "bitsandbytes LLM.int8 (vector-wise int8, fp16 outlier columns)" if c["w_bits"] == 8 else \
            f"bitsandbytes NF4, blocks of {c['group_size']}, double-quantized absmax"
    fp8 = " e4m3" if c["dtype"] == "fp8_e4m3" else ""
    w = f"W{c['w_bits'] or 16}{fp8} {c['w_granularity']}" + (f"/{c['group_size']}" if c["w_granularity"] ==
                                                                "per_group" else "")
    a = f"A{c['a_bits']}{fp8} {c['a_granularity']}" if c["a_bits"] else "A16"
    how = "repq + " if c["reparam"] == "repq" else ""
    how += f"gptq weights, {c['observer']} acts" if c["rounding"] == "gptq" else c["observer"]
    extra = f", {c['softmax']} softmax" if c["softmax"] != "none" else ""
    return f"{w}, {a}, {how}{extra}"


def _latency(base: nn.Module, model: nn.Module, batch: int, repeat: int) -> dict[str, float]:
    """The dense base at the fastest dense dtype (``auto``) + SDPA vs ``model`` (deployed formats run as they are),
    alternately in one process."""

    size, cfg = data_config(base)["input_size"], BenchConfig()
    r = compare(model_runner(base, batch, size, cfg), model_runner(model, batch, size, cfg),
                device=cfg.resolve_device(), warmup=2, warmup_s=1.0, repeat=repeat)
    return {"speedup": round(r["speedup"], 3), "dense_ms": round(r["a_median_ms"], 2),
            "ms": round(r["b_median_ms"], 2)}


def _without_onednn(run: Any) -> Any:
    def go() -> Any:
        int8_linear.HAS_ONEDNN = False
        try:
            return run()
        finally:
            int8_linear.HAS_ONEDNN = True
    return go


def speed(out: Path, batch_sizes: list[int], arch: str, repeat: int, only: list[str] | None = None) -> None:
    """Every deployed format vs the dense model (fastest dense dtype) + SDPA on ``arch``, alternately in one process;
    first the dense model in fp32 against bf16, so the table shows which dense dtype is the fastest here."""

    base = create_model(arch)
    rows, skipped = [], {}
    size = data_config(base)["input_size"]
    for bs in batch_sizes:
        bf16, fp32 = BenchConfig(dtype="bf16"), BenchConfig(dtype="fp32")
        r = compare(model_runner(base, bs, size, bf16), model_runner(copy.deepcopy(base), bs, size, fp32),
                    device=bf16.resolve_device(), warmup=2, warmup_s=1.0, repeat=repeat)
        rows.append({"format": "dense fp32", "batch": bs, "speedup": round(r["speedup"], 3),
                     "dense_ms": round(r["a_median_ms"], 2), "ms": round(r["b_median_ms"], 2),
                     "throughput": round(1000 * bs / r["b_median_ms"], 1),
                     "size_mb": round(serialized_size_mb(base), 1)})
        print(f"dense fp32, batch {bs}: {r['speedup']:.3f}x vs bf16", flush=True)
    formats = {k: v for k, v in RECIPE["speed"].items() if not only or any(o in k for o in only)}
    device = BenchConfig().resolve_device()
    if device.type == "cuda":  # auto = our Triton GEMM there; also time cuBLASLt's
        formats["int8 W8A8 (per-token, torch._int_mm)"] = [{**RECIPE["speed"]["int8 W8A8 (per-token)"][0],
                                                             "backend": "torch"}]
    for name, stack in formats.items():
        q, spec = copy.deepcopy(base), stack[-1]
        try:
            apply_stack(q, stack)
        except ConfigError as e:  # e.g. bitsandbytes not installed on this machine: say so in the table
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})", flush=True)
            continue
        for bs in batch_sizes:
            r = _latency(base, q, bs, repeat)
            rows.append({"format": name, "batch": bs, **r, "throughput": round(1000 * bs / r["ms"], 1),
                         "size_mb": round(serialized_size_mb(q), 1)})
            print(f"{name}, batch {bs}: {r['speedup']:.3f}x vs dense", flush=True)
            if device.type == "cpu" and int8_linear.HAS_ONEDNN and spec.get("mode") == "deploy" and \
                    spec.get("a_granularity") == "per_token" and "dtype" not in spec and "backend" not in spec:
                # the CPU path before oneDNN (torch._int_mm), timed against the oneDNN one in the same process
                new = model_runner(q, bs, data_config(q)["input_size"], BenchConfig())
                r = compare(_without_onednn(new), new, warmup=1, repeat=repeat)
                rows.append({"format": f"{name}: oneDNN vs torch._int_mm", "batch": bs,
                             "speedup": round(r["speedup"], 3), "dense_ms": None, "ms": round(r["b_median_ms"], 2),
                             "throughput": round(1000 * bs / r["b_median_ms"], 1), "size_mb": rows[-1]["size_mb"],
                             "int_mm_ms": round(r["a_median_ms"], 2)})
                print(f"{name}, batch {bs}: oneDNN {r['speedup']:.3f}x vs torch._int_mm", flush=True)
    res = {"arch": arch, **run_context(device), "repeat": repeat, "dense_dtype": str(BenchConfig().dtype.on(device)),
           "fp32_size_mb": round(serialized_size_mb(base), 1), "rows": rows, "skipped": skipped}
    atomic_write_json(out / "speed_deploy_vs_bf16.json", res)
    lines = [f"# Deployed quantization vs the fastest dense dtype + SDPA: {arch}", "",
             f"Device: {res['device']}; torch {res['versions']['torch']}; {res['date']}. Each format is timed "
             f"alternately with the dense model at {res['dense_dtype']} (`auto`: the fastest dense dtype measured on "
             f"this machine) + SDPA in one process, median of {repeat}. Speedup > 1 "
             f"means the quantized model is faster. fp32 artifact: {res['fp32_size_mb']} MiB.", "",
             "The `oneDNN vs torch._int_mm` rows time the CPU's int8 engine against the `torch._int_mm` path it "
             "replaced (speedup > 1: oneDNN is faster; dense ms column: the _int_mm time). The `dense fp32` rows time "
             "fp32 against bf16 autocast (dense ms column: bf16).", "",
             markdown_table(["format", "batch", "speedup", "dense ms", "quantized ms", "img/s", "size MiB"],
                            [[r["format"], r["batch"], f"**{r['speedup']:.2f}x**", r["dense_ms"] or r.get("int_mm_ms"),
                              r["ms"], r["throughput"], r["size_mb"]] for r in rows]
                            + [[name, None, f"skipped: {why}", "", "", "", ""] for name, why in skipped.items()])]
    atomic_write_text(out / "speed_deploy_vs_bf16.md", "\n".join(lines) + "\n")


def markdown(res: dict[str, Any]) -> str:
    base = res["rows"][0]
    lines = ["# Post-training quantization on the digits testbed: accuracy, size, latency", "",
             f"Artifact trained by `recipes/digits_vit.yaml`; digits test ({res['images']['digits']} images) and "
             f"digits-c ({res['images']['digits-c']} images, the sensitive split); bf16 autocast; "
             f"{res['device']}; torch {res['versions']['torch']}, timm {res['versions']['timm']}; {res['date']}. "
             f"Calibration: {res['calib_size']} images of the digits train split. Agreement: top-1 equal to the "
             "float model's on the same image. Each target's first row is the naive minmax RTN baseline. "
             "*simulate* rows are accuracy-only (fake quantization in floating point: their size is the float "
             f"artifact's and they have no latency). Latency: batch {res['latency_batch']} on this machine vs "
             "the bf16 + SDPA float model, alternately in one process (> 1 is faster).", "",
             markdown_table(
                 ["target", "variant", "quantizer", "executes", "size MiB", "top-1", "Δ top-1", "digits-c top-1",
                  "**digits-c agreement**", "latency vs bf16"],
                 [[r.get("target"), r["variant"], r["details"] or None,
                   "deploy" if r.get("deployable") else ("float" if r is base else "simulate"), r["size_mb"],
                   r["digits_top1"], f"{r['digits_top1'] - base['digits_top1']:+.2f}", r["digits-c_top1"],
                   f"**{r['digits-c_agreement']:.2f}**",
                   f"{r['latency']['speedup']:.2f}x" if r.get("latency") else None] for r in res["rows"]],
                 align="llllrrrrrr")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", help="the digits testbed (not needed with --speed-only)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--speed", action="store_true", help="also time every deployed format on --arch")
    parser.add_argument("--speed-only", action="store_true", help="only the --speed part")
    parser.add_argument("--formats", default="", help="--speed: only formats whose name contains one of these "
                        "comma-separated strings (default: all)")
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args(argv)
    if args.speed or args.speed_only:
        speed(args.out, [int(b) for b in args.batch_sizes.split(",")], args.arch, args.repeat,
              [f.strip() for f in args.formats.split(",") if f.strip()])
    if args.speed_only:
        return 0
    if args.artifact is None:
        print("error: ARTIFACT is required unless --speed-only", file=sys.stderr)
        return 2

    calib = Calibration("digits", args.calib_size)  # the same train-split images for every variant

    def build(spec: dict[str, Any]):
        def fn(base: nn.Module) -> nn.Module:
            return apply_stack(copy.deepcopy(base), [{**step, "calib_size": args.calib_size} for step in spec],
                               calib=calib)
        return fn

    targets = RECIPE["accuracy"]
    labels = {f"{target}: {name}": (target, name) for target, rows in targets.items() for name in rows}
    built_by = {key: build(targets[target][name]) for key, (target, name) in labels.items()}
    built: dict[str, nn.Module] = {}

    def details(model: nn.Module) -> str:
        return _details(model_info(model).transforms[-1]["config"])

    res = accuracy_table(args.artifact, built_by, details=details, keep=built)
    base = built.pop("uncompressed")
    for row in res["rows"][1:]:
        model = built[row["variant"]]
        row["target"], row["variant"] = labels[row["variant"]]
        state = model_info(model).transforms[-1]["state"]
        row["deployable"] = bool(state.get("deployable"))
        if row["deployable"]:
            row["latency"] = _latency(base, model, args.latency_batch, args.repeat)
            print(f"{row['variant']}: {row['latency']['speedup']:.3f}x vs bf16", flush=True)

    res.update(run_context(BenchConfig().resolve_device()), calib_size=args.calib_size,
               latency_batch=args.latency_batch)
    atomic_write_json(args.out / "accuracy_digits.json", res)
    atomic_write_text(args.out / "accuracy_digits.md", markdown(res))
    print(f"wrote {args.out / 'accuracy_digits'}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

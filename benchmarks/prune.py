"""Pruning, measured: ``python -m benchmarks.prune ARTIFACT --out results/prune [--speed] [--memory]``.

Accuracy: structured (heads / MLP) and block-structured pruning of the digits testbed, before and after
recovery fine-tuning (distillation from the unpruned model, <= 10 epochs on the train split).
Speed (``--speed``): the pruned vit_base_patch16_224 vs the dense one, bf16 + SDPA, timed alternately.
Memory (``--memory``): peak memory of a training step, attention-only vs full fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from vitcompress import Calibration, apply_stack, create_model, data_config, model_info
from vitcompress.bench import BenchConfig, compare, count_flops, model_runner, serialized_size_mb
from vitcompress.bench.measure import train_step_peak_mb
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table
from vitcompress.transforms.recovery import attention_params

from . import variants
from .accuracy import accuracy_markdown, accuracy_table

WARMUP_S = float(os.environ.get("VITCOMPRESS_BENCH_WARMUP_S", "2.0"))  # per timed pair; the GPU runbook lowers it

RECIPE = variants.load("prune")  # accuracy variants: benchmarks/recipes/prune.yaml


def _details(model: nn.Module) -> str:
    info = model_info(model)
    parts = []
    for t in info.transforms:
        c, s = t["config"], t["state"]
        if t["name"] == "recovery":
            continue
        if t["name"] == "prune":
            parts.append(f"{c['criterion']} {c['scope']}; params x{s.get('params_fraction', 1):.2f}")
        else:
            parts.append(f"{c['criterion']}; sparsity {s.get('sparsity', 0):.2f}")
    rec = info.provenance.get("recovery")
    parts.append("recovery: " + ("none" if rec is None else f"{rec['level']}, {rec['config']['epochs']} ep "
                                 f"{rec['config']['distill']}" + (", attn-only" if rec["config"]["attn_only"] else "")
                                 + f", {rec.get('seconds', 0):.0f} s"))
    return "; ".join(parts)


CPU_BSR_NOTE = ("Block-sparse layers run dense-masked on this CPU (timed faster than torch BSR, which has no bf16 "
                "CPU kernel), so they do no less work: their small-batch gain comes from keeping a bf16 copy of "
                "the weight, which the dense model re-casts under autocast on every call.")


def speed(out: Path, batch_sizes: list[int], arch: str = "vit_base_patch16_224", repeat: int = 7) -> None:
    """Pruned vs dense ViT-B/16, alternately in one process (weights do not change speed)."""
    base = create_model(arch)
    size, cfg = data_config(base)["input_size"], BenchConfig()
    device = cfg.resolve_device()
    n_base, size_base, gf_base = sum(p.numel() for p in base.parameters()), serialized_size_mb(base), \
        count_flops(base, size) / 1e9
    rows = []
    for name, stack in RECIPE["speed"].items():
        m = apply_stack(copy.deepcopy(base), stack)
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        row = {"variant": name, "params_ratio": round(n / n_base, 3),
               "size_ratio": round(serialized_size_mb(m) / size_base, 3),
               "gflops_ratio": round(count_flops(m, size) / 1e9 / gf_base, 3), "speedup": {}, "ms": {}}
        if name.startswith("block") and device.type == "cpu":
            impls = {r["cpu_impl"] for r in m.vitcompress_info.transforms[-1]["state"]["layers"].values()}
            row["cpu_impl"] = sorted(impls)
        for bs in batch_sizes:
            r = compare(model_runner(base, bs, size, cfg), model_runner(m, bs, size, cfg), device=device,
                        warmup=2, warmup_s=WARMUP_S, repeat=repeat)
            row["speedup"][str(bs)] = round(r["speedup"], 3)
            row["ms"][str(bs)] = {"dense": round(r["a_median_ms"], 2), "pruned": round(r["b_median_ms"], 2)}
            print(f"{name} vs dense, batch {bs}: {r['speedup']:.3f}x", flush=True)
        rows.append(row)
    res = {"arch": arch, **run_context(device), "repeat": repeat, "dtype": "bf16 autocast + SDPA",
           "base": {"params": n_base, "size_mb": round(size_base, 2), "gflops": round(gf_base, 3)}, "rows": rows}
    atomic_write_json(out / "speed_vit_b16.json", res)
    lines = [f"# Pruned vs dense {arch} at 224 px", "",
             f"Device: {res['device']}; torch {res['versions']['torch']}; {res['date']}. bf16 autocast + SDPA; "
             f"both timed alternately in one process, median of {repeat}. Speedup > 1 means the pruned model "
             "is faster. Weights are random (they do not change speed); heads and MLP are pruned per layer. "
             + (CPU_BSR_NOTE if device.type == "cpu" else "Block-sparse layers run the Triton BSR GEMM."), "",
             markdown_table(
                 ["variant", "params", "size", "GFLOPs",
                  *(h for b in batch_sizes for h in (f"b{b} speedup", f"b{b} ms dense / pruned"))],
                 [[r["variant"] + (f" (CPU impl: {', '.join(r['cpu_impl'])})" if "cpu_impl" in r else ""),
                   f"x{r['params_ratio']}", f"x{r['size_ratio']}", f"x{r['gflops_ratio']}",
                   *(c for b in batch_sizes for c in (f"**{r['speedup'][str(b)]:.2f}x**",
                                                       f"{r['ms'][str(b)]['dense']} / {r['ms'][str(b)]['pruned']}"))]
                  for r in rows])]
    atomic_write_text(out / "speed_vit_b16.md", "\n".join(lines) + "\n")


def memory(out: Path, artifact: str, arch: str = "vit_base_patch16_224", batch: int = 16) -> None:
    """Peak training-step memory: attention-only vs full fine-tuning (AdamW, bf16 autocast)."""
    cfg = BenchConfig(device="cpu")
    rows = []
    for name, b in ((arch, batch), (f"digits testbed ({artifact})", 64)):
        m = create_model(arch) if name == arch else create_model(artifact)
        size = data_config(m)["input_size"]
        full = train_step_peak_mb(m, list(m.parameters()), b, size, cfg)
        attn = train_step_peak_mb(m, attention_params(m), b, size, cfg)
        rows.append({"model": name, "batch": b, "full_mb": round(full, 1), "attn_only_mb": round(attn, 1),
                     "ratio": round(attn / full, 3),
                     "trainable_fraction": round(sum(p.numel() for p in attention_params(m))
                                                 / sum(p.numel() for p in m.parameters()), 3)})
        print(f"{name}: full {full:.0f} MiB, attn-only {attn:.0f} MiB", flush=True)
    res = {**run_context(cfg.resolve_device()), "rows": rows}
    atomic_write_json(out / "memory_attn_only.json", res)
    lines = ["# Peak memory of one fine-tuning step: attention-only vs full", "",
             f"Device: {res['device']}; torch {res['versions']['torch']}; {res['date']}. First AdamW step "
             "(forward, backward, optimizer-state allocation) in bf16 autocast; weights + the profiler's "
             "allocation high-water mark.", "",
             markdown_table(["model", "batch", "trainable", "full MiB", "attn-only MiB", "ratio"],
                            [[r["model"], r["batch"], f"{r['trainable_fraction']:.0%}", r["full_mb"], r["attn_only_mb"],
                              f"**x{r['ratio']}**"] for r in rows])]
    atomic_write_text(out / "memory_attn_only.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", help="the digits testbed (not needed for --speed --no-accuracy)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--speed", action="store_true", help="time pruned vs dense ViT-B/16")
    parser.add_argument("--memory", action="store_true", help="attn-only vs full fine-tuning peak memory")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args(argv)
    if args.artifact is None and (args.memory or not args.no_accuracy):
        print("error: ARTIFACT is required for the accuracy table and --memory", file=sys.stderr)
        return 2
    if args.speed:
        speed(args.out, [int(b) for b in args.batch_sizes.split(",")])
    if args.memory:
        memory(args.out, args.artifact)
    if args.no_accuracy:
        return 0

    def build(stack: list[dict[str, Any]]):
        def fn(base: nn.Module) -> nn.Module:  # recovery distils from the unpruned base
            return apply_stack(copy.deepcopy(base), stack, calib=Calibration("digits", 32), teacher=base)
        return fn

    res = accuracy_table(args.artifact, {k: build(v) for k, v in RECIPE["accuracy"].items()}, details=_details)
    atomic_write_json(args.out / "accuracy_digits.json", res)
    atomic_write_text(args.out / "accuracy_digits.md", accuracy_markdown(
        res, "Pruning accuracy, before and after recovery: the digits testbed", "importance; recovery",
        " Recovery: fine-tuning on the digits train split (1,257 images), AdamW, lr 5e-4, soft distillation "
        "(alpha 0.7, T 1) from the unpruned model unless noted; 'CE' uses the labels only."))
    print(f"wrote {args.out / 'accuracy_digits'}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Token reduction, measured: ``python -m benchmarks.tokens --out results/tokens [--accuracy ARTIFACT]``.

Speed: for each batch size, every variant is timed alternately with the unreduced model in one process
(bf16 autocast + fused SDPA for both) and reported as a speedup ratio with both medians, plus GFLOPs per
image. Weights do not change speed, so the speed model is randomly initialised (no download).
Accuracy (``--accuracy``): each variant of a trained artifact (the digits testbed) on digits and digits-c:
top-1 and agreement with the unreduced model on the same images.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch

from vitcompress import apply_stack, create_model, data_config
from vitcompress.bench import BenchConfig, compare, count_flops, model_runner
from vitcompress.data import load_data
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table
from vitcompress.transforms.sparse_attn.transform import flops_saved
from vitcompress.transforms.token_merge.adaptive import is_adaptive, measure

from . import variants
from .accuracy import accuracy_markdown, accuracy_table

WARMUP_S = float(os.environ.get("VITCOMPRESS_BENCH_WARMUP_S", "2.0"))  # per timed pair; the GPU runbook lowers it

RECIPE = variants.load("tokens")  # speed / accuracy variants: benchmarks/recipes/tokens.yaml


def _build(model: torch.nn.Module, stack: variants.Stack, flops_of: dict[str, float]) -> torch.nn.Module:
    return apply_stack(copy.deepcopy(model), variants.resolve(stack, flops_of))


def _flops(model: torch.nn.Module, size: tuple[int, ...], images: torch.Tensor) -> float:
    """FLOPs per image: counted, less sparse attention's skipped tiles; adaptive counts: mean over ``images``."""
    if is_adaptive(model):
        return measure(model, [images])["gflops_mean"] * 1e9
    return count_flops(model, size) - flops_saved(model)


def run(arch: str, batch_sizes: list[int], repeat: int, stacks: dict[str, variants.Stack]) -> dict[str, Any]:
    base = create_model(arch)
    size = data_config(base)["input_size"]
    cfg = BenchConfig()
    device = cfg.resolve_device()
    base_flops = count_flops(base, size)
    # content matters to the adaptive methods: every variant (and the base) runs on the same real images, the
    # first digits test images, upsampled (random weights: the counts are the random model's)
    images = next(iter(load_data("digits", data_config(base), limit=max(batch_sizes)).loader(max(batch_sizes))))[0]
    rows, flops_of = [], {}
    for name, stack in stacks.items():
        model = _build(base, stack, flops_of)
        vsize = data_config(model)["input_size"]
        flops = _flops(model, vsize, images if vsize == size else None)
        flops_of[name] = flops / base_flops
        for bs in batch_sizes:
            imgs = images if vsize == size else None
            r = compare(model_runner(base, bs, size, cfg, images), model_runner(model, bs, vsize, cfg, imgs),
                        device=device, warmup=2, warmup_s=WARMUP_S, repeat=repeat)
            rows.append({"variant": name, "stack": stack, "batch": bs, "speedup": round(r["speedup"], 3),
                         "base_ms": round(r["a_median_ms"], 2), "variant_ms": round(r["b_median_ms"], 2),
                         "base_img_s": round(bs / r["a_median_ms"] * 1000, 1),
                         "variant_img_s": round(bs / r["b_median_ms"] * 1000, 1),
                         "gflops": round(flops / 1e9, 3), "gflops_fraction": round(flops / base_flops, 3)})
            print(f"{name:28s} b{bs:<4d} speedup {r['speedup']:.3f}x  ({r['a_median_ms']:.1f} -> "
                  f"{r['b_median_ms']:.1f} ms)  GFLOPs {flops / base_flops:.3f}", flush=True)
    return {"arch": arch, "base_gflops": round(base_flops / 1e9, 3), "dtype": str(cfg.dtype), "sdpa": cfg.sdpa,
            **run_context(device), "repeat": repeat, "rows": rows}


def _schedule(model: torch.nn.Module) -> str:
    if not model.vitcompress_info.transforms:
        return ""
    state = model.vitcompress_info.transforms[-1]["state"]
    return str(state["schedule"]) if "schedule" in state else f"{model.patch_embed.img_size[0]} px input"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Token reduction speed: {res['arch']}", "",
             f"Device: {res['device']}; {res['dtype']} autocast, SDPA; torch {res['versions']['torch']}, "
             f"timm {res['versions']['timm']}; {res['date']}. Base: {res['base_gflops']} GFLOPs/image. "
             f"Each row: variant and unreduced model timed alternately in one process, median of "
             f"{res['repeat']}.", "",
             markdown_table(["variant", "batch", "speedup", "base ms", "variant ms", "img/s base -> variant",
                             "GFLOPs (fraction)"],
                            [[r["variant"], r["batch"], f"**{r['speedup']:.2f}x**", r["base_ms"], r["variant_ms"],
                              f"{r['base_img_s']} -> {r['variant_img_s']}",
                              f"{r['gflops']} ({r['gflops_fraction']:.2f})"] for r in res["rows"]])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + "; ".join(RECIPE["speed"]))
    parser.add_argument("--accuracy", default=None, metavar="ARTIFACT", help="accuracy table for this artifact")
    args = parser.parse_args(argv)
    if args.accuracy:

        res = accuracy_table(args.accuracy, {k: (lambda base, v=v: _build(base, v, {}))
                                             for k, v in RECIPE["accuracy"].items()}, details=_schedule)
        atomic_write_json(args.out / "accuracy_digits.json", res)
        atomic_write_text(args.out / "accuracy_digits.md", accuracy_markdown(
            res, "Token reduction accuracy: the digits testbed", "schedule (tokens removed per layer)"))
        print(f"wrote {args.out / 'accuracy_digits'}.json/.md")
        return 0
    res = run(args.arch, [int(b) for b in args.batch_sizes.split(",")], args.repeat,
              variants.select(RECIPE["speed"], args.variants))
    stem = f"speed_{res['arch']}_{'cuda' if 'cpu:' not in res['device'] else 'cpu'}"
    atomic_write_json(args.out / f"{stem}.json", res)
    atomic_write_text(args.out / f"{stem}.md", markdown(res))
    print(f"wrote {args.out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which dense setup is the fastest on this machine: fp32 vs bf16 autocast, side by side, per model and batch.

    python -m benchmarks.dense_dtype --models results/cifar10/testbed,vit_base_patch16_224 --batch-sizes 1,64 \
        --out results/cifar10

The speed baseline of every table is the fastest dense setup measured on the machine, never assumed: on a CPU
with native bf16 a ViT-B is faster in bf16, while a tiny model may not be (its matmuls are too small to repay
the casts). Random weights time the same as trained ones.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from vitcompress import create_model, data_config
from vitcompress.bench import BenchConfig, compare, model_runner
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated timm ids or artifacts")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    fp32, bf16 = BenchConfig(dtype="fp32"), BenchConfig(dtype="bf16")
    device = fp32.resolve_device()
    rows = []
    for spec in args.models.split(","):
        model = create_model(spec)
        size = data_config(model)["input_size"]
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            r = compare(model_runner(model, bs, size, fp32), model_runner(copy.deepcopy(model), bs, size, bf16),
                        device=device, warmup=2, warmup_s=1.0, repeat=args.repeat)
            rows.append({"model": spec, "batch": bs, "fp32_ms": round(r["a_median_ms"], 3),
                         "bf16_ms": round(r["b_median_ms"], 3), "bf16_speedup": round(r["speedup"], 3),
                         "fastest": "bf16" if r["speedup"] > 1 else "fp32"})
            print(rows[-1], flush=True)
    res = {"command": "python -m benchmarks.dense_dtype " + " ".join(argv if argv is not None else sys.argv[1:]),
           **run_context(device), "repeat": args.repeat, "rows": rows}
    md = "\n".join([
        "# The fastest dense setup on this machine: fp32 vs bf16 autocast", "",
        f"{res['device']}; torch {res['versions']['torch']}; {res['date']}. Reproduce: `{res['command']}`. Both "
        f"timed alternately in one process with SDPA, median of {args.repeat}; bf16 speedup > 1: bf16 is faster.", "",
        markdown_table(["model", "batch", "fp32 ms", "bf16 ms", "bf16 speedup", "fastest"],
                       [[r["model"], r["batch"], r["fp32_ms"], r["bf16_ms"], f"{r['bf16_speedup']:.2f}x",
                         f"**{r['fastest']}**"] for r in rows]), ""])
    write_results(args.out, "dense_dtype", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CIFAR-10 token reduction re-timed against the fastest dense setup (issue #20): each training-free point of
``recipes/cifar10_tokens.yaml`` against the testbed at fp32 or bf16, whichever is faster at that batch size.

    python -m benchmarks.tokens_cifar10_speed --data ../shared/data/cifar10 --out results/tokens

The sweep timed every point against the fp32 testbed; on a CPU with native bf16 the testbed is faster in bf16 at
batch 64 (``results/cifar10/dense_dtype.md``), so that column overstated the speedups there. Here the base runs
in its fastest dtype per batch, and each point in whichever dtype is faster for it, all on real test images (the
adaptive methods' work depends on the content). The learned points (LTMP, DiffRate-style) are left out: each needs
an epoch of training to rebuild.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from vitcompress import Calibration, apply_stack, create_model, data_config
from vitcompress.bench import BenchConfig, compare, model_runner
from vitcompress.data import load_data
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10_tokens.yaml"
TRAINED = ("learned_merge",)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    sweep = yaml.safe_load(RECIPE.read_text())["sweep"]
    base = create_model(sweep["base"]["artifact"])
    size = data_config(base)["input_size"]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    images = next(iter(load_data(args.data, data_config(base), split="test", limit=max(sizes)).loader(max(sizes))))[0]
    cfgs = {"fp32": BenchConfig(dtype="fp32", device="cpu"), "bf16": BenchConfig(dtype="bf16", device="cpu")}
    device = cfgs["fp32"].resolve_device()

    def runner(model: Any, bs: int, dtype: str) -> Any:
        return model_runner(model, bs, size, cfgs[dtype], images)

    fastest = {}
    for bs in sizes:  # the dense baseline per batch size: measured, not assumed
        r = compare(runner(base, bs, "fp32"), runner(copy.deepcopy(base), bs, "bf16"), device=device, warmup=2,
                    warmup_s=0.5, repeat=args.repeat)
        fastest[bs] = "bf16" if r["speedup"] > 1 else "fp32"
    rows = []
    calib = Calibration(sweep["calib_data"], sweep["calib_size"])
    for point in sweep["points"]:
        if any(step["name"] in TRAINED for step in point["stack"]):
            continue
        model = apply_stack(copy.deepcopy(base), point["stack"], calib=calib)
        row: dict[str, Any] = {"point": point["name"]}
        for bs in sizes:
            best = None
            for dtype in ("fp32", "bf16"):
                r = compare(runner(base, bs, fastest[bs]), runner(model, bs, dtype), device=device, warmup=2,
                            warmup_s=0.3, repeat=args.repeat)
                if best is None or r["speedup"] > best[0]:
                    best = (r["speedup"], dtype)
            row[f"b{bs}"] = {"speedup": round(best[0], 3), "dtype": best[1], "base_dtype": fastest[bs]}
        rows.append(row)
        print(row, flush=True)
    given = argv if argv is not None else sys.argv[1:]
    res = {"command": "python -m benchmarks.tokens_cifar10_speed " + " ".join(given), **run_context(device),
           "repeat": args.repeat, "base_dtype": {str(k): v for k, v in fastest.items()}, "rows": rows}
    md = "\n".join([
        "# Token reduction on CIFAR-10: CPU speedups against the fastest dense setup", "",
        f"{res['device']}; torch {res['versions']['torch']}; {res['date']}. Reproduce: `{res['command']}`.",
        "Base: the testbed in its fastest dense dtype at each batch size (" + ", ".join(
            f"batch {k}: {v}" for k, v in fastest.items()) + "); each point in its own fastest dtype (shown), timed "
        f"alternately with the base in one process on real test images, median of {args.repeat}. The learned "
        "points (LTMP, DiffRate-style) need training to rebuild and are not re-timed here.", "",
        markdown_table(["point", *(h for bs in sizes for h in (f"speedup b{bs}", f"dtype b{bs}"))],
                       [[r["point"], *(c for bs in sizes for c in (f"**{r[f'b{bs}']['speedup']:.2f}x**",
                                                                   r[f"b{bs}"]["dtype"]))] for r in rows]), ""])
    write_results(args.out, "cifar10_speed_vs_fastest_dense", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

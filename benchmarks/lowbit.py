"""Low-bit PTQ on CIFAR-10 (issue #21): the mixed-precision front (top-1 against the mean weight bits) and the
W4A4 goal, from a finished ``recipes/cifar10_lowbit.yaml`` sweep.

    python -m benchmarks.lowbit --sweep results/quant/cifar10_lowbit --out results/quant/cifar10_lowbit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitcompress.report import load_points, markdown_table, pareto_front, write_results

CLEAN, CORRUPT = "../shared/data/cifar10", "cifar10-c:../shared/data/cifar10"
TODAY = ("W4A4 minmax", "W4A4 mse")  # the W4A4 methods before issue #21


def mean_bits(p: dict[str, Any]) -> float | None:
    """Uniform points: their weight width; mixed points: their budget (the allocation stays at or under it)."""
    step = p["stack"][-1]
    if step["name"] == "mixed_precision":
        return float(step["mean_bits"])
    return float(step["w_bits"]) if step.get("w_bits") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, default=Path("results/quant/cifar10_lowbit"))
    ap.add_argument("--out", type=Path, default=Path("results/quant/cifar10_lowbit"))
    args = ap.parse_args(argv)
    _, points = load_points(args.sweep)
    pts = [p for p in points if p.get("status") == "ok" and p["family"] != "base"]
    base = next(p for p in points if p["family"] == "base")
    rows = [{"point": p["name"], "bits": mean_bits(p), "top1": p["accuracy"][CLEAN]["top1"],
             "agreement": p["accuracy"][CLEAN]["agreement"], "c_agreement": p["accuracy"][CORRUPT]["agreement"]}
            for p in pts if mean_bits(p) is not None]
    front = {rows[i]["point"] for i in pareto_front([r["bits"] for r in rows], [r["top1"] for r in rows])}
    w4 = {r["point"]: r["top1"] for r in rows if r["point"].startswith("W4A4")}
    today = max(w4[n] for n in TODAY if n in w4)
    best_new = max((n for n in w4 if n not in TODAY), key=w4.get)
    uniform5 = next(r for r in rows if r["point"] == "W5A5 mse")
    mixed5 = [r for r in rows if r["point"].startswith("mixed") and r["bits"] == 5.0]
    goals = [{"goal": "best W4A4 with the new techniques minus the best of today's (top-1, pts)",
              "measured": round(w4[best_new] - today, 2), "target": ">= 2", "met": w4[best_new] - today >= 2,
              "detail": f"{best_new} {w4[best_new]:.2f} vs {today:.2f}"}]
    goals += [{"goal": f"{r['point']} minus uniform W5A5 (top-1, pts)",
               "measured": round(r["top1"] - uniform5["top1"], 2), "target": "> 0", "met": r["top1"] > uniform5["top1"],
               "detail": f"agreement {r['agreement']:.2f} vs {uniform5['agreement']:.2f}; cifar10-c agreement "
                         f"{r['c_agreement']:.2f} vs {uniform5['c_agreement']:.2f}"} for r in mixed5]
    res = {"sweep": str(args.sweep), "base_top1": base["accuracy"][CLEAN]["top1"], "rows": rows, "goals": goals,
           "device": base["device"], "versions": base["versions"], "date": base["date"]}
    md = "\n".join([
        "# Low-bit PTQ on CIFAR-10: the mixed-precision front and the W4A4 goal", "",
        f"From `{args.sweep}` (`vitcompress sweep recipes/cifar10_lowbit.yaml --out {args.sweep}`; 10,000 test images, "
        f"cifar10-c); base top-1 {res['base_top1']:.2f} %; {res['device']}, torch {res['versions']['torch']}, "
        f"{res['date']}. Reproduce this page: `python -m benchmarks.lowbit`. Bits: the weight width (uniform points; "
        "activations the same) or the mixed point's budget. Front: no other point has fewer bits and a higher top-1. "
        "One test-set top-1 has a standard error of about 0.45 pt.", "",
        markdown_table(["point", "mean bits", "top-1", "agreement", "cifar10-c agreement", "front"],
                       [[r["point"], r["bits"], r["top1"], r["agreement"], r["c_agreement"],
                         "★" if r["point"] in front else ""]
                        for r in sorted(rows, key=lambda r: (r["bits"], -r["top1"]))],
                       align="lrrrrl"), "", "## Goals", "",
        markdown_table(["goal", "measured", "target", "met", "detail"],
                       [[g["goal"], g["measured"], g["target"], "yes" if g["met"] else "**missed**", g["detail"]]
                        for g in goals], align="lrlll"), ""])
    write_results(args.out, "bits_front", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

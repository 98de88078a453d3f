"""Token reduction on CIFAR-10 at equal GFLOPs: ``python -m benchmarks.tokens_cifar10 --sweep
results/tokens/cifar10_sweep --out results/tokens``.

Reads the finished sweep of ``recipes/cifar10_tokens.yaml`` (every point on the 10,000 test images and on
cifar10-c) and writes ``cifar10_methods.md`` / ``.json``: each method's points with their measured GFLOPs
(the mean per image for adaptive counts, the computed tiles for sparse attention), clean and cifar10-c top-1,
agreement, the tokens kept (mean and spread over the images), CPU speedups at batch 1 and 64, and the
training time of the learned ones; then ToMe's top-1 interpolated at each point's GFLOPs (linear between the
two ToMe points around it) and the goals of the token-reduction issue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.report import markdown_table

from .cifar10 import CLEAN, CORRUPT, load_points

FAMILIES = ("ToMe", "EViT", "ATS", "mass", "LTMP", "DiffRate", "sparse", "ToMe 0.65x + sparse")


def family(name: str) -> str:
    return next((f for f in reversed(FAMILIES) if name.startswith(f)), "base")


def tome_at(points: dict[str, dict[str, Any]], frac: float, base_gflops: float) -> float | None:
    """ToMe's clean top-1 interpolated at ``frac`` x GFLOPs (None outside its measured range)."""
    tome = sorted((p["gflops"] / base_gflops, p["accuracy"][CLEAN]["top1"]) for n, p in points.items()
                  if family(n) == "ToMe")
    tome.append((1.0, points["base (uncompressed)"]["accuracy"][CLEAN]["top1"]))
    for (f0, a0), (f1, a1) in zip(tome, tome[1:]):
        if f0 - 0.005 <= frac <= f1:  # a solver lands within 0.005 of its target: count that as equal
            return a0 + (a1 - a0) * (frac - f0) / (f1 - f0) if f1 > f0 else a0
    return None


def rows(points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    base = points["base (uncompressed)"]
    bg = base["gflops"]
    out = []
    for name, p in sorted(points.items(), key=lambda kv: (FAMILIES.index(family(kv[0])) if family(kv[0]) in
                                                            FAMILIES else -1, -kv[1]["gflops"])):
        frac = p["gflops"] / bg
        tok = (p.get("tokens") or {}).get(CLEAN) or {}
        train_s = (p.get("training_record") or {}).get("seconds")
        ref = tome_at(points, frac, bg)
        out.append({"point": name, "family": family(name), "gflops_fraction": round(frac, 3),
                    "top1": p["accuracy"][CLEAN]["top1"], "agreement": p["accuracy"][CLEAN]["agreement"],
                    "c_top1": p["accuracy"][CORRUPT]["top1"], "c_agreement": p["accuracy"][CORRUPT]["agreement"],
                    "tome_top1_at_gflops": ref, "vs_tome": None if ref is None else p["accuracy"][CLEAN]["top1"] - ref,
                    "tokens_last_mean": tok.get("tokens_last_mean"), "tokens_last_std": tok.get("tokens_last_std"),
                    "tokens_last_range": [tok.get("tokens_last_min"), tok.get("tokens_last_max")] if tok else None,
                    "speedup_b1": p["speedup"].get("1"), "speedup_b64": p["speedup"].get("64"),
                    "train_seconds": train_s})
    return out


def goals(table: list[dict[str, Any]], base_top1: float) -> list[dict[str, Any]]:
    new = [r for r in table if r["family"] in ("ATS", "mass", "LTMP", "DiffRate") and r["gflops_fraction"] <= 0.65
           and r["vs_tome"] is not None]
    best = max(new, key=lambda r: r["vs_tome"]) if new else None
    out = [{"goal": "a new method beats ToMe's top-1 at equal GFLOPs (<= 0.65x) by >= 0.5 pt",
            "measured": None if best is None else round(best["vs_tome"], 2),
            "met": None if best is None else best["vs_tome"] >= 0.5,
            "detail": "" if best is None else f"{best['point']} at {best['gflops_fraction']:.3f}x: "
            f"{best['top1']:.2f} % vs ToMe {best['tome_top1_at_gflops']:.2f} %"}]
    times = [r["train_seconds"] for r in table if r["train_seconds"] is not None]
    if times:
        out.append({"goal": "the learned methods train in <= 10 minutes on the 2-core CPU",
                    "measured": round(max(times) / 60, 2), "met": max(times) <= 600,
                    "detail": f"slowest of {len(times)} trainings (one epoch of the 50,000 train images)"})
    sparse = [r for r in table if r["family"] == "sparse" and "50 %" in r["point"]]
    if sparse:
        s = max(sparse, key=lambda r: r["top1"])
        out.append({"goal": "sparse attention at 50 % key-block density within 1 pt of dense (32 px)",
                    "measured": round(base_top1 - s["top1"], 2), "met": base_top1 - s["top1"] <= 1.0,
                    "detail": f"best tiling: {s['point']} (top-1 loss, pts)"})
    return out


def _f(v: Any, d: int = 2) -> str:
    return "—" if v is None else f"{v:+.{d}f}" if isinstance(v, float) and d < 0 else f"{v:.{d}f}" \
        if isinstance(v, float) else str(v)


def markdown(table: list[dict[str, Any]], gl: list[dict[str, Any]], base: dict[str, Any], sweep: Path) -> str:
    lines = ["# Token reduction on CIFAR-10 at equal GFLOPs", "",
             f"The CIFAR-10 testbed (`results/cifar10/testbed`, top-1 {base['accuracy'][CLEAN]['top1']:.2f} %, "
             f"{base['gflops']:.4f} GFLOPs/image), 10,000 test images and cifar10-c; {base['device']}, torch "
             f"{base['versions']['torch']}, {base['date']}. CPU speedups: fp32, timed alternately with the base at "
             "batch 1 and 64 on real test images.", "",
             "Reproduce: `vitcompress sweep recipes/cifar10_tokens.yaml --out results/tokens/cifar10_sweep`, then "
             "`python -m benchmarks.tokens_cifar10`.", "",
             "ToMe @ GFLOPs: ToMe's top-1 interpolated at the point's GFLOPs. Tokens: kept at the last block, mean "
             "± std over the test images [min, max] (adaptive methods only).", "",
             markdown_table(
                 ["point", "GFLOPs ×", "top-1", "ToMe @ GFLOPs", "vs ToMe", "agreement", "cifar10-c top-1",
                  "cifar10-c agr.", "tokens (last)", "speedup b1", "speedup b64", "training"],
                 [[r["point"], f"{r['gflops_fraction']:.3f}", r["top1"], r["tome_top1_at_gflops"],
                   None if r["vs_tome"] is None else f"{r['vs_tome']:+.2f}", r["agreement"], r["c_top1"],
                   r["c_agreement"],
                   None if r["tokens_last_mean"] is None else
                   f"{r['tokens_last_mean']:.1f} ± {r['tokens_last_std']:.1f} {r['tokens_last_range']}",
                   f"{_f(r['speedup_b1'])}×", f"{_f(r['speedup_b64'])}×",
                   None if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f} min"] for r in table],
                 align="lrrrrrrrlrrr"),
             "", "## Goals", "",
             markdown_table(["goal", "measured", "met", "detail"],
                            [[g["goal"], g["measured"], None if g["met"] is None else "yes" if g["met"] else
                              "**missed**", g["detail"]] for g in gl], align="lrll")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("results/tokens/cifar10_sweep"))
    parser.add_argument("--out", type=Path, default=Path("results/tokens"))
    args = parser.parse_args(argv)
    points = load_points(args.sweep)
    if "base (uncompressed)" not in points:
        print(f"error: no finished sweep in {args.sweep} (run the sweep first)", file=sys.stderr)
        return 2
    base = points["base (uncompressed)"]
    table = rows(points)
    gl = goals(table, base["accuracy"][CLEAN]["top1"])
    atomic_write_json(args.out / "cifar10_methods.json", {"rows": table, "goals": gl, "sweep": str(args.sweep)})
    text = markdown(table, gl, base, args.sweep)
    atomic_write_text(args.out / "cifar10_methods.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Robustness of compressed models on CIFAR-10: ``python -m benchmarks.robustness --sweep
results/robustness/cifar10_sweep --out results/robustness``.

Reads the finished sweep of ``recipes/cifar10_robustness.yaml`` and writes ``cifar10.md`` / ``.json``: per point
its clean top-1, and for each attack of the recipe the robust top-1 on the attacked images (white-box through the
point's gradient twin, and transferred from the base) with the transfer rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.report import markdown_table

from .cifar10 import CLEAN, load_points


def table(points: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    labels = sorted({lab for p in points.values() for lab in (p.get("robustness") or {})},
                    key=lambda s: (s.split()[1], s.split()[2] != "self", s))
    rows = []
    order = ["base (uncompressed)"] + sorted(n for n in points if n != "base (uncompressed)")
    for name in order:
        p = points[name]
        rob = p.get("robustness") or {}
        first = next(iter(rob.values()), {})
        rows.append({"point": name, "top1": p["accuracy"][CLEAN]["top1"],
                     "attacked_clean_top1": first.get("clean_top1"),
                     **{f"robust {lab}": rob.get(lab, {}).get("robust_top1") for lab in labels},
                     **{f"transfer {lab}": rob.get(lab, {}).get("transfer_rate") for lab in labels
                        if lab.endswith("base")}})
    return labels, rows


def markdown(labels: list[str], rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    att = next(iter(base.get("robustness", {}).values()), {})
    cols = [k for k in rows[0] if k.startswith(("robust ", "transfer "))]
    lines = ["# Robustness of compressed models: the CIFAR-10 testbed", "",
             f"PGD-{att.get('steps')} (L-inf, step 2.5 eps / steps, seeded random start) on the first "
             f"{att.get('images')} test images; `self` = white-box on the point, `base` = crafted on the uncompressed "
             "base and transferred. Transfer rate = the share of the base's successful adversarial examples (clean "
             "correct, adversarial wrong on the base) that also fool the point. Gradients: "
             f"{att.get('gradient')}. {base['device']}, torch {base['versions']['torch']}, {base['date']}.", "",
             "Reproduce: `vitcompress sweep recipes/cifar10_robustness.yaml --out results/robustness/cifar10_sweep`, "
             "then `python -m benchmarks.robustness`.", "",
             markdown_table(["point", "top-1 (10k)", "top-1 (attacked images)", *cols],
                            [[r["point"], r["top1"], r["attacked_clean_top1"], *(r[c] for c in cols)] for r in rows])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("results/robustness/cifar10_sweep"))
    parser.add_argument("--out", type=Path, default=Path("results/robustness"))
    args = parser.parse_args(argv)
    points = load_points(args.sweep)
    if "base (uncompressed)" not in points:
        print(f"error: no finished sweep in {args.sweep} (run the sweep first)", file=sys.stderr)
        return 2
    labels, rows = table(points)
    atomic_write_json(args.out / "cifar10.json", {"attacks": labels, "rows": rows, "sweep": str(args.sweep)})
    text = markdown(labels, rows, points["base (uncompressed)"])
    atomic_write_text(args.out / "cifar10.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

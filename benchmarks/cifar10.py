"""The CIFAR-10 goals, checked from a finished sweep: ``python -m benchmarks.cifar10 --sweep results/cifar10/sweep
--out results/cifar10``.

The sweep (``vitcompress sweep recipes/cifar10_sweep.yaml --out results/cifar10/sweep``) measures every point on
the 10,000 test images and on cifar10-c; this script reads its points and writes ``goals.md`` / ``goals.json``:
each goal of the CIFAR-10 issue with its measured figure and whether it is met, against the testbed's fp32 top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.report import markdown_table

CLEAN = "../shared/data/cifar10"
CORRUPT = "cifar10-c:../shared/data/cifar10"


def load_points(sweep: Path) -> dict[str, dict[str, Any]]:
    pts = [json.loads(p.read_text()) for p in sorted((sweep / "points").glob("*.json"))]
    return {p["name"]: p for p in pts if p.get("status") == "ok"}


def _top1(p: dict[str, Any], spec: str = CLEAN) -> float:
    return p["accuracy"][spec]["top1"]


def goals(points: dict[str, dict[str, Any]], testbed: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal as ``{goal, measured, target, met}``; ``measured`` is a loss in points unless stated."""
    base = points["base (uncompressed)"]
    b1, bg = _top1(base), base["gflops"]
    out: list[dict[str, Any]] = []

    def add(goal: str, measured: float | None, target: str, met: bool | None, detail: str = "") -> None:
        out.append({"goal": goal, "measured": None if measured is None else round(measured, 2), "target": target,
                    "met": met, "detail": detail})

    def loss(name: str) -> float:
        return b1 - _top1(points[name])

    def best(prefix: str) -> tuple[str, float]:
        cands = {n: loss(n) for n in points if n.startswith(prefix)}
        name = min(cands, key=cands.get)
        return name, cands[name]

    top1, minutes = testbed.get("top1"), testbed.get("train_seconds", 0) / 60
    add("testbed top-1 (%)", top1, ">= 75, trained in <= 100 min", top1 is not None and top1 >= 75 and minutes <= 100,
        f"{minutes:.1f} min training loop")
    tome = {n: p for n, p in points.items() if n.startswith("ToMe") and "+" not in n and p["gflops"] / bg <= 0.65}
    if tome:
        name = min(tome, key=lambda n: loss(n))
        add("ToMe at <= 0.65x GFLOPs, no training: top-1 loss", loss(name), "<= 1.0", loss(name) <= 1.0,
            f"{name} ({tome[name]['gflops'] / bg:.2f}x GFLOPs)")
    res = {n: p for n, p in points.items() if n.startswith("resolution")}
    for rname, rp in res.items():  # the ToMe point closest in GFLOPs, if one is within 0.05x
        frac = rp["gflops"] / bg
        near = min((n for n in points if n.startswith("ToMe") and "+" not in n),
                   key=lambda n: abs(points[n]["gflops"] / bg - frac))
        if abs(points[near]["gflops"] / bg - frac) > 0.05:
            continue
        gap = _top1(points[near]) - _top1(rp)
        goal = frac <= 0.65  # the goal is at <= 0.65x GFLOPs; milder points are shown for information
        add(f"ToMe vs {rname} at equal GFLOPs: top-1 gain" + ("" if goal else " (information)"), gap, ">= 2.0",
            gap >= 2.0 if goal else None, f"{near} at {points[near]['gflops'] / bg:.2f}x vs {frac:.2f}x GFLOPs")
    if "W8A8 int8 (deploy)" in points:
        add("W8A8 deploy: top-1 loss", loss("W8A8 int8 (deploy)"), "<= 0.3", loss("W8A8 int8 (deploy)") <= 0.3)
    for prefix, target in (("W6A6", 0.5), ("W4A8", 1.0), ("W4A4", 4.0)):
        if any(n.startswith(prefix) for n in points):
            name, val = best(prefix)
            naive = f"{prefix} minmax"
            add(f"best {prefix}: top-1 loss", val, f"<= {target}", val <= target,
                f"{name}; naive minmax RTN: {loss(naive):.2f}" if naive in points else name)
    for bits in ("W4A8", "W3A8"):
        seq, one = f"{bits} gptq", f"{bits} gptq one-pass (Hessians from the float model)"
        if seq in points and one in points:
            gain = _top1(points[seq]) - _top1(points[one])
            add(f"{bits}: sequential GPTQ minus one-pass GPTQ, top-1", gain, ">= 0", gain >= 0,
                f"{_top1(points[seq]):.2f} vs {_top1(points[one]):.2f} %")
    key = "heads -25 % MLP -50 % + distill"
    if key in points:
        add("heads 25 % + MLP 50 % with 2 epochs distillation: top-1 loss", loss(key), "<= 2.5", loss(key) <= 2.5)
        before = points["heads -25 % MLP -50 %"]["accuracy"][CORRUPT]["agreement"]
        after = points[key]["accuracy"][CORRUPT]["agreement"]
        add("recovery raises cifar10-c agreement (after - before, pts)", after - before, "> 0", after > before,
            f"{before:.2f} -> {after:.2f} %")
    return out


def recovery_goals(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pruning goals again, with the recovery settings chosen on held-out train data (cifar10_recovery)."""
    test = {r["candidate"]: r for r in rec["test"]}
    base, before, chosen = test["testbed"], test["pruned, no recovery"], test[rec["chosen"]]
    loss = base["test_top1"] - chosen["test_top1"]
    gain = chosen["cifar10-c_agreement"] - before["cifar10-c_agreement"]
    return [{"goal": "heads 25 % + MLP 50 %, recovery chosen on held-out train data: top-1 loss",
             "measured": round(loss, 2), "target": "<= 2.5", "met": loss <= 2.5, "detail": rec["chosen"]},
            {"goal": "the chosen recovery raises cifar10-c agreement (after - before, pts)", "measured": round(gain, 2),
             "target": "> 0", "met": gain > 0,
             "detail": f"{before['cifar10-c_agreement']:.2f} -> {chosen['cifar10-c_agreement']:.2f} %"}]


def markdown(rows: list[dict[str, Any]], base: dict[str, Any], sweep: Path) -> str:
    lines = ["# CIFAR-10 goals", "",
             f"From the sweep in `{sweep}` (10,000 test images; cifar10-c: the same images, one seeded corruption "
             "each). "
             f"Base: the CIFAR-10 testbed, top-1 {_top1(base):.2f} %, cifar10-c top-1 {_top1(base, CORRUPT):.2f} %, "
             f"{base['gflops']:.3f} GFLOPs/image; {base['device']}, torch {base['versions']['torch']}, {base['date']}.",
             "", "Reproduce: `vitcompress sweep recipes/cifar10_sweep.yaml --out results/cifar10/sweep`, then "
             "`python -m benchmarks.cifar10 --sweep results/cifar10/sweep --out results/cifar10`.", "",
             markdown_table(["goal", "measured", "target", "met", "detail"],
                            [[r["goal"], r["measured"], r["target"],
                              None if r["met"] is None else ("yes" if r["met"] else "**missed**"), r["detail"]]
                             for r in rows], align="lrlll")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("results/cifar10/sweep"))
    parser.add_argument("--testbed", type=Path, default=Path("results/cifar10/testbed"))
    parser.add_argument("--out", type=Path, default=Path("results/cifar10"))
    parser.add_argument("--recovery", type=Path, default=Path("results/cifar10/recovery/recovery.json"),
                        help="the held-out recovery search (benchmarks.cifar10_recovery), when present")
    args = parser.parse_args(argv)
    points = load_points(args.sweep)
    if "base (uncompressed)" not in points:
        print(f"error: no finished sweep in {args.sweep} (run the sweep first)", file=sys.stderr)
        return 2
    testbed = json.loads((args.testbed / "vitcompress.json").read_text()).get("metrics", {})
    rows = goals(points, testbed)
    if args.recovery.exists():
        rows += recovery_goals(json.loads(args.recovery.read_text()))
    atomic_write_json(args.out / "goals.json", {"goals": rows, "sweep": str(args.sweep)})
    atomic_write_text(args.out / "goals.md", markdown(rows, points["base (uncompressed)"], args.sweep))
    print(markdown(rows, points["base (uncompressed)"], args.sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())

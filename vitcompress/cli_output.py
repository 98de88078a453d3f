"""What the CLI prints: rich tables for metrics, evaluations and sweep fronts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .report import timed


def fmt(v: Any) -> str:
    """A number as a table cell: 4 significant digits, thousands separators for large values."""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(title: str, rows: dict[str, Any]) -> None:

    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        table.add_row(k, fmt(v) if v is not None else "—")
    Console().print(table)


def print_records(title: str, out: Any, records: list[dict[str, Any]]) -> None:
    """What a compress command did: each applied transform's recorded state (scalars and short lists)."""
    rows: dict[str, Any] = {"artifact": str(out)}
    for rec in records:
        state = rec.get("state") or {}
        if "deployable" in state:
            rows[f"{rec['name']} runs as"] = "deployable" if state["deployable"] else "accuracy-only (simulated)"
        for k, v in state.items():
            if isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 24
                                                          and all(isinstance(x, (int, float)) for x in v)):
                rows[f"{rec['name']} {k}"] = v
    print_table(title, rows)


def print_eval(r: dict[str, Any]) -> None:
    rows: dict[str, Any] = {
        "model": (r["model"]["source"] or r["model"]["arch"])
        + (" (RANDOM WEIGHTS: the accuracy means nothing)" if r["model"].get("random_weights") else ""),
        "data": f"{r['data']['spec']} ({r['data']['split']}, {r['n_images']} images)",
        "top1 %": r["top1"], "top5 %": r["top5"], "agreement %": r["agreement"], "kl": r["kl"],
    }
    if r["agreement"] is None:  # say why, rather than a bare dash
        rows["agreement %"] = "— (no reference: pass --reference, or an artifact with a recorded base)"
    for g, m in (r.get("groups") or {}).items():
        agreement = "—" if m["agreement"] is None else fmt(m["agreement"])
        rows[f"  {g} top1 / agr %"] = f"{fmt(m['top1'])} / {agreement}"
    for bs, lat in (r.get("latency_ms") or {}).items():
        rows[f"latency b{bs} ms (p95)"] = f"{lat['median']:.3f} ({lat['p95']:.3f})"
    rows.update({"throughput img/s": r.get("throughput"), "peak mem MiB": r.get("peak_mem_mb"),
                 "params": r["params"], "GFLOPs/img": r["gflops"], "size MiB": r["size_mb"],
                 "device": f"{r['device']}, {r['dtype']}"})
    tok = r.get("tokens")
    if tok:
        rows["tokens kept (last layer)"] = (f"{tok['tokens_last_mean']} ± {tok['tokens_last_std']} "
                                            f"[{tok['tokens_last_min']}, {tok['tokens_last_max']}]")
    att = r.get("attack")
    if att:
        rows[f"{att['method']} eps {att['eps']:.4g} ({att['source']})"] = f"robust top1 {fmt(att['robust_top1'])} %"
        if att["source"] == "base":
            rate = "—" if att["transfer_rate"] is None else fmt(att["transfer_rate"])
            rows["transfer rate %"] = f"{rate} (of {att['base_successes']} base successes)"
    print_table("eval", rows)


def print_fronts(sweep_dir: Path) -> None:
    """The base's accuracy and the front of a written sweep report (accuracy against latency, or against GFLOPs
    when nothing was timed), one row per point, with report.md's numbers (x the fastest dense row)."""
    res = json.loads((Path(sweep_dir) / "pareto.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    # only the files the report wrote (a speed-only sweep has no picture)
    table = {label: str(Path(sweep_dir) / name) for label, name in
             (("report", "report.md"), ("picture", "pareto.png"), ("csv", "points.csv"))
             if (Path(sweep_dir) / name).is_file()}
    metric = res.get("accuracy_metric")
    base = next((r for r in res["rows"] if r["family"] == "base"), None)
    if base is not None and metric and base.get("accuracy") is not None:
        table["base"] = f"{metric} {base['accuracy']:.2f}"
    is_timed = timed(res)
    best = (res.get("best_dense") or {}).get(str(res["reference_batch"]), "—")
    for name in res["front_latency"] if is_timed else res.get("front_gflops") or []:
        r = rows[name]
        where = (f"{r['vs_best_dense']:.2f}x the fastest dense ({best}) at b{res['reference_batch']}"
                 if is_timed and r.get("vs_best_dense") is not None else f"{r['gflops']:.3f} GFLOPs")
        acc = "" if r["accuracy"] is None else f"{metric} {r['accuracy']:.2f} ({r['delta']:+.2f}), "
        table[f"★ {name}"] = f"{acc}{where}, {r['kind']}"
    if res["failed"]:
        table["failed points"] = len(res["failed"])
    print_table("accuracy-vs-latency front" if timed else "accuracy-vs-GFLOPs front (nothing timed)", table)

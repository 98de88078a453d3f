"""Every results writer: Markdown tables, CSV, the Pareto picture, and ``vitcompress report DIR``.

``markdown_table`` / ``csv_text`` / ``write_results`` are what the benchmark scripts write ``results/`` with;
the rest builds a sweep's report: Pareto fronts, a Markdown report, a picture and a CSV from a sweep directory.

Reads ``DIR/sweep.json`` (the points of the current recipe, in order) and ``DIR/points/<id>.json``.
A point is on a front when no other point is at least as good on both axes and better on one:
accuracy (higher) against latency at the reference batch (lower), and accuracy against size on disk.
Writes ``report.md``, ``pareto.png``, ``points.csv`` and ``pareto.json``, atomically.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .goals import judge, metric_of
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .transforms import config_from_dict

FAMILY_COLORS = {"base": "black", "dense": "dimgrey", "peer": "tab:brown", "token": "tab:blue", "quant": "tab:orange",
                 "prune": "tab:green", "block-sparse": "tab:olive", "stacked": "tab:red"}
SPARE_COLORS = ["tab:purple", "tab:pink", "tab:cyan", "tab:gray"]  # families without a colour of their own


Cell = str | int | float | None


def cell(value: Cell, digits: int = 2) -> str:
    """One Markdown cell: floats at ``digits`` decimals, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Cell]], *, align: str | None = None,
                   digits: int = 2) -> str:
    """A Markdown table. align: one character per column, ``l`` or ``r`` (default: first column left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns, header {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """CSV of ``rows`` (dicts with the same keys), header first."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_results(out: str | Path, stem: str, res: dict[str, Any], md: str) -> Path:
    """Write ``out/stem.json`` and ``out/stem.md`` atomically; returns ``out/stem``."""
    out = Path(out)
    atomic_write_json(out / f"{stem}.json", res)
    atomic_write_text(out / f"{stem}.md", md if md.endswith("\n") else md + "\n")
    print(f"wrote {out / stem}.json/.md")
    return out / stem


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the non-dominated points for x lower-is-better and y higher-is-better, sorted by x."""
    front = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dominated = any((xj <= x and yj >= y) and (xj < x or yj > y) for j, (xj, yj) in enumerate(zip(xs, ys))
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (xs[i], -ys[i]))


def load_points(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep description and the recorded points of its current recipe (missing ones left out)."""
    out = Path(out)
    try:
        sweep = json.loads((out / "sweep.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{out} is not a sweep directory (no sweep.json)") from None
    except ValueError:
        raise DataError(f"{out / 'sweep.json'} is corrupt") from None
    points = []
    for p in sweep["points"]:
        try:
            points.append(json.loads((out / "points" / f"{p['id']}.json").read_text()))
        except (FileNotFoundError, ValueError):
            continue
    return sweep, points


def _metric(p: dict[str, Any], accuracy: str) -> float | None:
    v = metric_of(p, accuracy)
    if v is None and accuracy.endswith(":top1"):  # no labels: fall back to agreement
        v = metric_of(p, accuracy[: -len("top1")] + "agreement")
    return v


def _dense_best(ok: list[dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """Per batch size: the fastest dense row (the base in any runtime), as (name, its speedup over the anchor)."""
    best: dict[str, tuple[str, float]] = {}
    for p in ok:
        if p["family"] in ("base", "dense") or p.get("dense"):
            for bs, sp in (p.get("speedup") or {}).items():
                if bs not in best or sp > best[bs][1]:
                    best[bs] = (p["name"], sp)
    return best


def _dtype(p: dict[str, Any], ref: str) -> str | None:
    """The dtype the point ran in at the reference batch (recorded since auto resolves per model and batch), else
    the one its accuracy pass ran in."""
    d = p.get("dtype")
    return (d.get(ref) if isinstance(d, dict) else d) or p.get("accuracy_dtype")


def _fixed_dtype(p: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """For records without one: the dtype that cannot have varied (exports run fp32; a fixed bench dtype)."""
    if p.get("runtime", "torch") not in ("torch", "torch-compile"):
        return "fp32"
    fixed = cfg["bench"].get("dtype")
    return fixed if fixed and fixed != "auto" else None


def _short(column: str) -> str:
    """A column named after a data spec, shown without its path: ``../x/cifar10_top1`` -> ``cifar10_top1``."""
    spec, _, key = column.rpartition("_")
    kind, _, source = spec.rpartition(":")
    name = Path(source).name or source
    return f"{kind + ':' if kind else ''}{name}_{key}" if spec else column


def analyse(sweep: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fronts and per-point summaries (deltas against the base; speed-ups against the anchor and the fastest dense
    row)."""
    cfg = sweep["config"]
    ref = str(cfg.get("reference_batch") or max(cfg["bench"].get("batch_sizes", [1])))
    ok = [p for p in points if p.get("status") == "ok"]
    base = next((p for p in ok if p["family"] == "base"), None)
    acc = [_metric(p, cfg["accuracy"]) for p in ok]
    timed = [p for p in ok if p.get("speedup")]
    # Absolute latencies drift between points (10-30 % on a busy CPU); each point's speedup was measured side by
    # side with the base (the anchor), so latency = the sweep's median anchor latency / speedup is drift-free, and
    # the speed-up over the fastest dense row is a ratio of two such ratios.
    base_ms = {bs: statistics.median([p["base_latency_ms"][bs] for p in timed if bs in p["base_latency_ms"]])
               for bs in (timed[0]["speedup"] if timed else {})}
    best = _dense_best(ok)
    lat = [base_ms[ref] / p["speedup"][ref] if p.get("speedup") else None for p in ok]
    size = [p["size_mb"] for p in ok]
    valid = [i for i, a in enumerate(acc) if a is not None]
    with_lat = [i for i in valid if lat[i] is not None]
    f_lat = [with_lat[i] for i in pareto_front([lat[i] for i in with_lat], [acc[i] for i in with_lat])]
    f_size = [valid[i] for i in pareto_front([size[i] for i in valid], [acc[i] for i in valid])]
    f_flops = [valid[i] for i in pareto_front([ok[i]["gflops"] for i in valid], [acc[i] for i in valid])]
    rows = []
    for i, p in enumerate(ok):
        sp = p.get("speedup") or {}
        rows.append({"id": p["id"], "name": p["name"], "family": p["family"], "runtime": p.get("runtime", "torch"),
                     "dtype": _dtype(p, ref) or _fixed_dtype(p, cfg),
                     "kind": "deployable" if p["deployable"] else "accuracy-only",
                     "recovery": p["recovery"], "accuracy": acc[i], "delta": None if base is None or acc[i] is None
                     else acc[i] - _metric(base, cfg["accuracy"]),
                     **{f"{s}_{k}": m.get(k) for s, m in p["accuracy"].items() for k in ("top1", "agreement")},
                     "latency_ms": lat[i], "measured_ms": (p.get("latency_ms") or {}).get(ref, {}).get("median"),
                     "speedup": sp.get(ref), "vs_best_dense": sp[ref] / best[ref][1] if ref in sp else None,
                     "latency_by_batch": {bs: base_ms[bs] / v for bs, v in sp.items()},
                     "vs_best_dense_by_batch": {bs: v / best[bs][1] for bs, v in sp.items()},
                     "throughput": None if lat[i] is None else int(ref) * 1e3 / lat[i],
                     "peak_mem_mb": p.get("peak_mem_mb"), "size_mb": size[i],
                     "size_ratio": None if base is None else size[i] / base["size_mb"],
                     "gflops": p["gflops"], "params": p["params"],
                     **{f"{k}: {lab}": r.get(m) for lab, r in (p.get("robustness") or {}).items()
                        for k, m in (("robust", "robust_top1"), ("transfer", "transfer_rate"))},
                     "random_weights": bool(p.get("random_weights")),
                     "front_latency": i in f_lat, "front_size": i in f_size, "front_gflops": i in f_flops})
    robust = sorted({k for r in rows for k in r if k.startswith("robust: ")})
    # the robustness axis: the first attack on the point itself (white-box), else the first transferred one
    axis = next((k for k in robust if k.endswith(" self")), robust[0] if robust else None)
    f_rob: list[int] = []
    if axis:
        have = [i for i, r in enumerate(rows) if r.get(axis) is not None and lat[i] is not None]
        f_rob = [have[i] for i in pareto_front([lat[i] for i in have], [rows[i][axis] for i in have])]
    for i, r in enumerate(rows):
        r["front_robust"] = i in f_rob
    failed = [{"name": p["name"], "error": p.get("error")} for p in points if p.get("status") != "ok"]
    context = {k: (base or (ok[0] if ok else {})).get(k) for k in ("device", "versions", "date")}
    dtypes = sorted({r["dtype"] for r in rows if r["dtype"]})
    goals = judge(cfg.get("goals") or [], points, cfg["accuracy"]) if cfg.get("eval_data") else []
    return {"accuracy_metric": cfg["accuracy"] if cfg.get("eval_data") else None, "reference_batch": int(ref),
            "dtype": "/".join(dtypes) or str(cfg["bench"].get("dtype", "auto")),
            "batch_sizes": list(base_ms), "best_dense": {bs: name for bs, (name, _) in best.items()},
            "speed_model": cfg.get("speed_model"), "context": context, "rows": rows, "failed": failed,
            "front_latency": [ok[i]["name"] for i in f_lat], "front_size": [ok[i]["name"] for i in f_size],
            "front_gflops": [ok[i]["name"] for i in f_flops], "anchor": cfg.get("anchor") or "the base in torch",
            "robust_axis": axis, "front_robust": [ok[i]["name"] for i in f_rob], "goals": goals,
            "bits_front": _bits_front(rows, ok)}


def _report_fields(p: dict[str, Any]) -> dict[str, Any]:
    """What a point's families show in reports: recorded, or (points recorded before that) derived from its stack."""
    if "report" in p:
        return p["report"]
    return {k: v for s in p.get("stack") or [] for k, v in config_from_dict(s).report_fields().items()}


def _bits_front(rows: list[dict[str, Any]], ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points whose family reports a weight width (``w_bits``), with the accuracy-vs-bits front marked."""
    bits = [_report_fields(p).get("w_bits") for p in ok]
    have = [(r, b) for r, b in zip(rows, bits) if b and r["accuracy"] is not None]
    front = {i for i in pareto_front([b for _, b in have], [r["accuracy"] for r, _ in have])}
    return [{"name": r["name"], "w_bits": b, "accuracy": r["accuracy"], "front": i in front,
             **{k: v for k, v in r.items() if k.endswith(("_top1", "_agreement"))}} for i, (r, b) in enumerate(have)]


def markdown(res: dict[str, Any], title: str = "vitcompress sweep", command: str | None = None) -> str:
    ctx, ref = res["context"], res["reference_batch"]
    versions = ctx.get("versions") or {}
    best = res.get("best_dense") or {}
    lines = [f"# {title}", "",
             f"Device: {ctx.get('device')}; dtype as run: {res['dtype']} (per row below); torch "
             f"{versions.get('torch')}, timm {versions.get('timm')}, triton {versions.get('triton')}"
             + "".join(f", {k} {versions[k]}" for k in ("onnxruntime", "openvino", "nncf") if versions.get(k))
             + f"; {ctx.get('date')}.", *([f"Command: `{command}`", ""] if command else []),
             (f"Accuracy axis: `{res['accuracy_metric']}`. " if res["accuracy_metric"] else "Speed only. ")
             + ("Accuracy only: no point was timed." if not timed(res) else
                f"Each point is timed alternately with the anchor ({res.get('anchor') or 'the base in torch'}) in one "
                f"process at batch {ref} "
             "(median); latency = the sweep's median anchor latency / the point's speed-up over it, which removes "
             "the drift between points (img/s follows from it). **× best dense** = the point's speed-up over the "
             f"fastest dense row of this table (at b{ref}: {best.get(str(ref), '—')}), whatever runtime that is.")
             + (f" Latency, size and GFLOPs are measured on `{res['speed_model']['model']}` with the same stack "
                "(random weights)." if res.get("speed_model") else ""),
             f"★ = on the accuracy-vs-{'latency' if timed(res) else 'GFLOPs'} front, ◆ = on the "
             "accuracy-vs-size front. *accuracy-only* points "
             "simulate (fake-quantize) and run in floating point: their latency is not a deployment figure.", ""]
    if not res["rows"]:
        return "\n".join([*lines, "No finished points yet.", ""])
    acc_cols = [k for k in res["rows"][0] if k.endswith(("_top1", "_agreement"))]
    acc_cols += sorted({k for r in res["rows"] for k in r if k.startswith(("robust: ", "transfer: "))})
    accuracy = res["accuracy_metric"] is not None
    speed = any(r["latency_ms"] is not None for r in res["rows"])
    head = ["point", "family", "runtime", "dtype", "kind", "recovery", "front",
            *(["accuracy", "Δ", *map(_short, acc_cols)] if accuracy else []),
            *([f"latency ms b{ref}", "× best dense", "img/s", "peak MiB"] if speed else []),
            "size MiB", "size ×", "GFLOPs"]
    body = []
    for r in sorted(res["rows"], key=lambda r: (r["latency_ms"] is None, r["latency_ms"] or 0)):
        mark = ("★" if r["front_latency" if speed else "front_gflops"] else "") + ("◆" if r["front_size"] else "")
        name = r["name"] + (" †" if r.get("random_weights") else "")
        body.append([f"**{name}**" if r["front_latency"] else name, r["family"], r["runtime"],
                     r["dtype"] or "—", r["kind"], r["recovery"], mark,
                     *([_f(r["accuracy"], 2), _f(r["delta"], 2, sign=True), *(_f(r.get(k), 2) for k in acc_cols)]
                       if accuracy else []),
                     *([_f(r["latency_ms"], 3), f"{_f(r['vs_best_dense'], 2)}×", _f(r["throughput"], 0),
                        _f(r["peak_mem_mb"], 1)] if speed else []),
                     f"{r['size_mb']:.2f}", _f(r["size_ratio"], 2), f"{r['gflops']:.3f}"])
    lines.append(markdown_table(head, body, align="l" * 7 + "r" * (len(head) - 7)))
    if any(r.get("random_weights") for r in res["rows"]):
        lines += ["", "† random weights (a bare timm id, no --pretrained / checkpoint): a speed study; the "
                  "accuracy and agreement of these rows mean nothing."]
    if len(res.get("batch_sizes") or []) > 1:
        bss = res["batch_sizes"]
        lines += ["", "Per batch size: latency (ms) and speed-up over the fastest dense row at that batch ("
                  + ", ".join(f"b{b}: {best.get(b, '—')}" for b in bss) + ").", "",
                  "| point | " + " | ".join(f"b{b} ms | b{b} × best dense" for b in bss) + " |",
                  "|---|" + "---:|" * (2 * len(bss))]
        for r in res["rows"]:
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{_f(r['latency_by_batch'].get(b), 2)} | {_f(r['vs_best_dense_by_batch'].get(b), 2)}×"
                for b in bss) + " |")
    if res.get("bits_front"):
        cols = [k for k in res["bits_front"][0] if k.endswith(("_top1", "_agreement"))]
        lines += ["", "Weight bits (the family's mean weight width) against accuracy; ★ = on the front (no point "
                  "has fewer bits and a higher accuracy).", "",
                  markdown_table(["point", "mean bits", *map(_short, cols), "front"],
                                 [[b["name"], b["w_bits"], *(b[c] for c in cols), "★" if b["front"] else ""]
                                  for b in sorted(res["bits_front"], key=lambda b: (b["w_bits"], -b["accuracy"]))])]
    if res.get("goals"):
        lines += ["", "## Goals", "", markdown_table(
            ["goal", "measured", "target", "met", "detail"],
            [[g["goal"], g["measured"], g["target"] or "", "—" if g["met"] is None else "yes" if g["met"]
              else "**missed**", g["detail"]] for g in res["goals"]], align="lrlll")]
    lines += ["", f"Accuracy-vs-latency front: {', '.join(res['front_latency']) or '—'}." if speed else
              f"Accuracy-vs-GFLOPs front (no point was timed): {', '.join(res.get('front_gflops') or []) or '—'}.",
              f"Accuracy-vs-size front: {', '.join(res['front_size']) or '—'}.", ""]
    if res.get("robust_axis"):
        lines[-1:] = [f"Robustness-vs-latency front (`{res['robust_axis']}`): {', '.join(res['front_robust'])}.", ""]
    if res["failed"]:
        lines += ["Failed points:", ""] + [f"- {f['name']}: {f['error']}" for f in res["failed"]] + [""]
    return "\n".join(lines)


def _f(v: float | None, digits: int, sign: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _panel(ax: Any, rows: list[dict[str, Any]], xkey: str, ykey: str, front: str, xlabel: str, ylabel: str) -> None:
    """One scatter of ``ykey`` (higher is better) against ``xkey`` (lower is better), its front drawn."""
    rows = [r for r in rows if r.get(ykey) is not None]
    if not rows:
        return
    base = next((r for r in rows if r["family"] == "base"), None)
    ys_all = sorted(r[ykey] for r in rows)
    top = ys_all[-1]
    floor = max(ys_all[0], (base[ykey] if base else top) - 12.0)  # keep the interesting band readable
    lo = floor - 0.08 * (top - floor + 1e-9) - 0.5
    fams = list(dict.fromkeys([*(f for f in FAMILY_COLORS if any(r["family"] == f for r in rows)),
                               *(r["family"] for r in rows)]))
    spare = iter(SPARE_COLORS * len(fams))
    for fam in fams:
        color = FAMILY_COLORS.get(fam) or next(spare)
        pts = [r for r in rows if r["family"] == fam]
        for kind, filled in (("deployable", True), ("accuracy-only", False)):
            sel = [r for r in pts if (r["kind"] == "deployable") == filled]
            if sel:
                ax.scatter([r[xkey] for r in sel], [max(r[ykey], lo) for r in sel], s=220 if fam == "base" else 60,
                           marker="*" if fam == "base" else "o", label=fam if filled else f"{fam} ({kind})",
                           facecolors=color if filled else "none", edgecolors=color, zorder=3)
    fr = sorted((r for r in rows if r[front]), key=lambda r: r[xkey])
    ax.step([r[xkey] for r in fr], [r[ykey] for r in fr], where="post", color="grey", lw=1.5, ls="--",
            label="Pareto front", zorder=2)
    if base:
        ax.axhline(base[ykey], color="black", lw=0.6, alpha=0.4)
        ax.axvline(base[xkey], color="black", lw=0.6, alpha=0.4)
    for r in rows:
        clipped = r[ykey] < lo
        label = f"{r['n']}" + (f" {r['name']}" if r[front] or r["family"] == "base" else "") + \
            (f" ({r[ykey]:.1f} %, off scale)" if clipped else "")
        ax.annotate(label, (r[xkey], max(r[ykey], lo)), fontsize=7, xytext=(4, 3), textcoords="offset points",
                    fontweight="bold" if r[front] else "normal")
    ax.set_ylim(lo - 0.3, top + 0.08 * (top - floor + 1e-9) + 0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot(res: dict[str, Any]) -> bytes:
    """PNG bytes: accuracy vs latency and vs size (and, with an attack, robust top-1 vs latency), fronts drawn,
    families coloured, and a key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_latency = _latency_axis(res)
    rows = [{**r, "n": n} for n, r in enumerate((r for r in res["rows"] if r["accuracy"] is not None
                                                 and (r["latency_ms"] is not None or not on_latency)), 1)]
    lat = f"latency at batch {res['reference_batch']} (ms, lower is better)"
    acc = f"{res['accuracy_metric']} (%, higher is better)"
    first = ("latency_ms", "accuracy", "front_latency", lat, acc) if on_latency else \
        ("gflops", "accuracy", "front_gflops", "GFLOPs per image (lower is better; FLOPs are not speed)", acc)
    panels = [first, ("size_mb", "accuracy", "front_size", "size on disk (MiB, lower is better)", acc)]
    if res.get("robust_axis"):
        panels.append(("latency_ms", res["robust_axis"], "front_robust", lat,
                       f"{res['robust_axis']} (robust top-1 %, higher is better)"))
    fig, all_axes = plt.subplots(1, len(panels) + 1, figsize=(9 * len(panels), 6.2),
                                 gridspec_kw={"width_ratios": [1] * len(panels) + [0.72]})
    for ax, (xkey, ykey, front, xlabel, ylabel) in zip(all_axes, panels):
        _panel(ax, rows, xkey, ykey, front, xlabel, ylabel)
    all_axes[0].legend(fontsize=7, loc="lower right")
    key_ax = all_axes[-1]
    key_ax.axis("off")
    # the key shows report.md's numbers: x the fastest dense row (not the raw ratio over the anchor)
    speed = [f"{r['vs_best_dense']:5.2f}x" if on_latency else f"{r['gflops']:6.2f}" for r in rows]
    key_lines = [f"{r['n']:>2} {r['name'][:38]:<38} {r['accuracy']:6.2f} {sp:>6} {r['size_mb']:6.2f}"
                 + (" *" if r["kind"] != "deployable" else "") for r, sp in zip(rows, speed)]
    best = (res.get("best_dense") or {}).get(str(res["reference_batch"]), "—")
    col = "x dense" if on_latency else "GFLOPs"
    key_ax.text(0.0, 0.5, "\n".join([f" # {'point':<38} {'acc %':>6} {col:>6} {'MiB':>6}", *key_lines, "",
                                     *([f"x dense: x the fastest dense row at b{res['reference_batch']} ({best})"]
                                       if on_latency else []),
                                     "* accuracy-only (simulated, not a deployment speed)"]),
                fontsize=8.5, family="monospace", va="center", ha="left", transform=key_ax.transAxes)
    ctx = res["context"]
    what = ("latency" if on_latency else "GFLOPs") + ", size" + (" and robustness" if res.get("robust_axis") else "")
    fig.suptitle(f"{res['accuracy_metric']} vs {what}; bold: on the Pareto front — {ctx.get('device')}, "
                 f"{res['dtype']}, {str(ctx.get('date', ''))[:10]}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: str | Path, title: str | None = None) -> dict[str, Any]:
    """Write report.md, pareto.png, points.csv and pareto.json into the sweep directory ``out``."""
    out = Path(out)
    sweep, points = load_points(out)
    res = analyse(sweep, points)
    title = title or sweep["config"].get("title") or "vitcompress sweep"
    atomic_write_text(out / "report.md", markdown(res, title, sweep.get("command")))
    atomic_write_json(out / "pareto.json", res)
    if res["rows"]:
        atomic_write_text(out / "points.csv", csv_text(res["rows"]))
    if any(r["accuracy"] is not None for r in res["rows"]):  # a speed-only sweep has no accuracy axis to plot
        atomic_write_bytes(out / "pareto.png", plot(res))
    return res


def timed(res: dict[str, Any]) -> bool:
    """Whether the sweep timed its points (its report and console summary then speak of latency, else of GFLOPs)."""
    return bool(res.get("batch_sizes"))


def _latency_axis(res: dict[str, Any]) -> bool:
    """Whether the picture can plot accuracy against latency: a point has both (a speed-only sweep has none)."""
    return any(r["latency_ms"] is not None and r["accuracy"] is not None for r in res["rows"])

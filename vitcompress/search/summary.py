"""The end of a search: the chosen stack saved, exported and scored on the test split, and ``search.json`` /
``search.md``, whose speed figures are the report's (one timing per point, recorded in its sweep record)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..artifact import save_artifact
from ..data import load_data
from ..evaluate import accuracy_metrics, predict
from ..export import ExportConfig, export_model
from ..io import atomic_write_json, atomic_write_text
from ..models import data_config
from ..report import markdown_table, write_report
from ..sweep.config import SweepConfig
from ..sweep.run import SweepContext, build_point
from .config import SearchConfig


def finish(cfg: SearchConfig, out: Path, base: Any, ctx: SweepContext, full: SweepConfig,
           trials: list[dict[str, Any]], ref: float, timer: Any, sizes: tuple[int, int], start: float, log,
           peer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose, save and export the best feasible stack; score it on the test split; write the summary and report."""
    feasible = [t for t in trials if t.get("feasible")]
    best = max(feasible, key=lambda t: (t["speed"], -t["drop"]), default=None)
    report = write_report(out)  # the figures every file shows: x the fastest dense row, per point id
    rows = {r["id"]: r for r in report["rows"]}
    bs = str(cfg.batch_size)
    best_dense = (report.get("best_dense") or {}).get(bs)
    for t in trials:
        row = rows.get(t.get("point"))
        if row is not None:
            t["vs_best_dense"] = row["vs_best_dense"]
    summary: dict[str, Any] = {"config": cfg.to_dict(), "heldout": sizes[0], "heldout_small": sizes[1],
                               "reference": {"heldout": ref}, "best_dense": best_dense,
                               "measured": len([t for t in trials if t.get("stage") == "measured"]),
                               "trials": trials, "chosen": best, "peer": peer}
    if peer is not None and peer["point"] in rows:
        peer["vs_best_dense"] = rows[peer["point"]]["vs_best_dense"]
    if best is not None:
        model = build_point(base, best["stack"], full)
        tmp = out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_artifact(model, tmp)
        shutil.rmtree(out / "best", ignore_errors=True)
        tmp.rename(out / "best")
        if cfg.target.exported:
            (out / "best.onnx").unlink(missing_ok=True)
            export_model(model, out / "best.onnx", ExportConfig())
        sbs = {"batch_size": cfg.batch_size, "repeat": timer.repeat,
               "best": {"speedup_vs_dense": best["speed"], "vs_best_dense": best.get("vs_best_dense")}}
        if peer is not None:
            sbs["peer"] = {"speedup_vs_dense": peer["speed"], "vs_best_dense": peer.get("vs_best_dense")}
            sbs["best_vs_peer"] = best["speed"] / peer["speed"]
        summary["side_by_side"] = sbs
        test = load_data(cfg.data, data_config(base))
        metric = str(cfg.metric)
        b_logits, labels, _ = predict(base, test, cfg=ctx.bench)
        c_logits, _, _ = predict(model, test, cfg=ctx.bench)
        got, want = accuracy_metrics(c_logits, labels, b_logits), accuracy_metrics(b_logits, labels, b_logits)
        summary["test"] = {"images": len(test), metric: got.get(metric), "base": want.get(metric),
                           "drop": None if got.get(metric) is None else want[metric] - got[metric],
                           "agreement": got.get("agreement")}
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["line"] = _line(cfg, out, summary)
    atomic_write_json(out / "search.json", summary)
    atomic_write_text(out / "search.md", markdown(summary))
    log(summary["line"])
    return summary


def _line(cfg: SearchConfig, out: Path, s: dict[str, Any]) -> str:
    best, peer, sbs = s["chosen"], s.get("peer"), s.get("side_by_side") or {}
    if best is None:
        return (f"search: no measured stack kept the held-out drop within --max-drop {cfg.max_drop} pt "
                f"({s['measured']} measured in {s['seconds'] / 60:.1f} of {cfg.budget_minutes} min); "
                "the dense model stays")
    return (f"search: {best['speed']:.2f}x the dense {cfg.target} model at batch {cfg.batch_size} "
            f"({_x(best.get('vs_best_dense'))} the fastest dense, {s['best_dense']}); held-out drop "
            f"{_pm(best['drop'], best.get('drop_se'))} pt, test drop {s['test']['drop']:.2f} pt; {out / 'best'}"
            + (f", {out / 'best.onnx'}" if cfg.target.exported else "")
            + (f"; NNCF accuracy control: {peer['speed']:.2f}x (held-out drop {peer['drop']:.2f} pt): ours "
               f"{sbs['best_vs_peer']:.2f}x its speed" if peer and "peer" in sbs else ""))


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _pm(drop: float | None, se: float | None) -> str:
    if drop is None:
        return "—"
    return f"{drop:.2f}" + ("" if se is None else f" ± {se:.2f}")


def markdown(s: dict[str, Any]) -> str:
    """search.md: the settings, the chosen stack, every trial (its speed as report.md shows it)."""
    cfg = s["config"]
    chosen = (s.get("chosen") or {}).get("trial")
    body = []
    for t in s["trials"]:
        stack = " + ".join(", ".join(f"{k}={v}" for k, v in step.items()) for step in t["stack"]) or "dense"
        stage = t.get("stage", "") + (f" (= trial {t['repeat_of']}, not measured again)" if "repeat_of" in t else "")
        body.append([f"{t['trial']}" + (" **chosen**" if t["trial"] == chosen else ""), stack, stage,
                     t.get("drop_small"), _pm(t.get("drop"), t.get("drop_se")) if "drop" in t else None,
                     _x(t.get("speed")) if "speed" in t else None, _x(t.get("vs_best_dense"))])
    test, peer, sbs = s.get("test") or {}, s.get("peer"), s.get("side_by_side") or {}
    limit = (f"No measured stack kept the held-out {cfg['metric']} drop within --max-drop {cfg['max_drop']} pt "
             f"({s['measured']} measured within the {cfg['budget_minutes']}-minute budget): the dense model stays.")
    lines = [f"# vitcompress search: {cfg['model']} on {cfg['target']}, batch {cfg['batch_size']}", "",
             f"Budget {cfg['budget_minutes']} min (took {s['seconds']} s); max {cfg['metric']} drop "
             f"{cfg['max_drop']} pt on {s['heldout']} held-out train images (first check on {s['heldout_small']}); "
             "the test split is only reported.", "",
             (f"Chosen: trial {chosen}" + (f", test drop {test['drop']:.2f} pt on {test['images']} images"
                                           if test.get("drop") is not None else "") + ".") if chosen is not None
             else limit, "",
             f"Speed: each point timed once, alternately with the dense {cfg['target']} model at batch "
             f"{cfg['batch_size']} ({s['side_by_side']['repeat'] if sbs else '—'} alternating runs); **× dense "
             f"{cfg['target']}** is that ratio, **× best dense** divides by the fastest dense row "
             f"({s.get('best_dense') or '—'}), as in report.md, points.csv and pareto.png. Drops are ± one "
             "standard error (paired: from the images where the two models disagree).", "",
             markdown_table(["trial", "stack", "stage", "small held-out drop", "held-out drop",
                             f"× dense {cfg['target']}", "× best dense"], body, align="rllrrrr")]
    if "best" in sbs and peer and "peer" in sbs:
        lines += ["", f"NNCF quantize_with_accuracy_control (max drop {cfg['max_drop']} pt, held-out drop "
                      f"{peer['drop']} pt): {_x(sbs['peer']['speedup_vs_dense'])} the dense model; the chosen "
                      f"stack {_x(sbs['best']['speedup_vs_dense'])}: ours {sbs['best_vs_peer']:.2f}x its speed."]
    return "\n".join([*lines, ""])

"""Goals declared in a sweep recipe, judged on its finished points: the one way a results table states a target.

A goal (one entry of the recipe's ``goals:`` list)::

    {name: "best W6A6: top-1 loss", value: loss, point: {prefix: W6A6}, target: "<= 0.5"}
    {name: "W4A8: sequential minus one-pass GPTQ", value: gain, point: W4A8 gptq, versus: "W4A8 gptq one-pass",
     target: ">= 0", metric: "cifar10-c:DATA:agreement"}

value: ``loss`` (the base's metric minus the point's, in points), ``gain`` (the point's minus ``versus``'s) or
``metric`` (the point's own). point / versus: a point name, or a selector ``{prefix, names, skip, exclude,
max_gflops, nearest_gflops, within}`` (``skip``: names left out; ``exclude``: substrings of names left out) that
picks, among the points it admits, the best one for the goal (lowest loss, highest
metric; ``nearest_gflops: NAME`` picks the admitted point closest in GFLOPs to NAME, if within ``within`` x of
the base's GFLOPs). metric: ``DATA:top1`` or ``DATA:agreement`` (default: the sweep's accuracy). target: ``<= X``,
``>= X``, ``< X`` or ``> X``; none marks information.
"""

from __future__ import annotations

import operator
from typing import Any

from .errors import ConfigError

VALUES = ("loss", "gain", "metric")
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
SELECTOR_KEYS = {"prefix", "names", "skip", "exclude", "max_gflops", "nearest_gflops", "within"}


def check_goals(goals: list[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` for a goal that cannot be judged (before any point runs)."""
    for g in goals:
        name = g.get("name") or "?"
        unknown = sorted(set(g) - {"name", "value", "point", "versus", "target", "metric"})
        if unknown or "name" not in g or "point" not in g:
            raise ConfigError(f"goal '{name}': needs name and point" + (f"; unknown {', '.join(unknown)}"
                                                                         if unknown else ""))
        if g.get("value", "loss") not in VALUES:
            raise ConfigError(f"goal '{name}': value must be one of {', '.join(VALUES)}")
        if (g.get("value") == "gain") != ("versus" in g):
            raise ConfigError(f"goal '{name}': value gain needs versus (and only gain takes it)")
        for sel in (g["point"], g.get("versus")):
            if isinstance(sel, dict) and set(sel) - SELECTOR_KEYS:
                raise ConfigError(f"goal '{name}': selector keys are {', '.join(sorted(SELECTOR_KEYS))}")
        if g.get("target") is not None:
            _target(g)


def _target(g: dict[str, Any]) -> tuple[str, float]:
    text = str(g["target"]).strip()
    for sym in ("<=", ">=", "<", ">"):
        if text.startswith(sym):
            try:
                return sym, float(text[len(sym):])
            except ValueError:
                break
    raise ConfigError(f"goal '{g.get('name')}': target must be like '<= 1.0' or '> 0', got '{text}'")


def metric_of(p: dict[str, Any], metric: str) -> float | None:
    """A point record's ``DATA:top1`` or ``DATA:agreement`` (None if it was not measured)."""
    spec, _, key = metric.rpartition(":")
    return (p.get("accuracy") or {}).get(spec, {}).get(key)


def _select(sel: str | dict[str, Any], pts: dict[str, dict[str, Any]], base: dict[str, Any], metric: str,
            ) -> dict[str, Any] | None:
    if isinstance(sel, str):
        return pts.get(sel)
    bg = base["gflops"]
    cands = [p for n, p in pts.items() if n.startswith(sel.get("prefix", "")) and p["family"] != "base"
             and (not sel.get("names") or n in sel["names"]) and n not in (sel.get("skip") or [])
             and not any(x in n for x in sel.get("exclude") or [])
             and (sel.get("max_gflops") is None or p["gflops"] / bg <= sel["max_gflops"])
             and metric_of(p, metric) is not None]
    if sel.get("nearest_gflops"):
        ref = pts.get(sel["nearest_gflops"])
        if ref is None or not cands:
            return None
        near = min(cands, key=lambda p: abs(p["gflops"] - ref["gflops"]))
        return near if abs(near["gflops"] - ref["gflops"]) / bg <= sel.get("within", 0.05) else None
    return max(cands, key=lambda p: metric_of(p, metric), default=None)


def judge(goals: list[dict[str, Any]], points: list[dict[str, Any]], accuracy: str) -> list[dict[str, Any]]:
    """Each goal as ``{goal, measured, target, met, detail}`` (measured None: a point it needs did not finish)."""
    pts = {p["name"]: p for p in points if p.get("status") == "ok"}
    base = next((p for p in pts.values() if p["family"] == "base"), None)
    rows = []
    for g in goals:
        metric, value = g.get("metric") or accuracy, g.get("value", "loss")
        p = None if base is None else _select(g["point"], pts, base, metric)
        v = None if base is None or "versus" not in g else _select(g["versus"], pts, base, metric)
        measured, detail = None, ""
        if p is not None and (v is not None or value != "gain"):
            mine = metric_of(p, metric)
            other = metric_of(base, metric) if value == "loss" else metric_of(v, metric) if value == "gain" else None
            if mine is not None and (value == "metric" or other is not None):
                measured = other - mine if value == "loss" else mine - other if value == "gain" else mine
                detail = p["name"] + (f" ({p['gflops'] / base['gflops']:.2f}x GFLOPs)" if isinstance(g["point"], dict)
                                      else "")
                if value == "gain":
                    detail += f" vs {v['name']}: {mine:.2f} vs {other:.2f}"
        met = None
        if g.get("target") is not None and measured is not None:
            sym, x = _target(g)
            met = OPS[sym](measured, x)
        rows.append({"goal": g["name"], "measured": None if measured is None else round(measured, 2),
                     "target": g.get("target"), "met": met, "metric": metric, "detail": detail or "not measured"})
    return rows

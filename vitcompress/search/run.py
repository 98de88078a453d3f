"""``vitcompress search``: the fastest deployable stack on the target runtime whose held-out drop stays within budget.

An Optuna study (TPE with the drop as a constraint, stored in ``DIR/study.db`` so a killed search resumes) samples
stacks from the space (:mod:`.space`). Each trial is a sweep point (``DIR/points``, the sweep's report and resume
apply) measured in stages, cheap first (successive halving):

1. accuracy on a small held-out subset: a trial whose drop there exceeds the budget by more than two standard
   errors is rejected (pruned);
2. GFLOPs and weight size: a stack that removes no work and quantizes nothing cannot be faster: rejected;
3. accuracy on the full held-out split, then speed on the target at the batch size, timed alternately with the
   target's dense model in this process (:class:`_Timer`), so the objective is the speed-up over that dense model
   (the sweep record's shared-anchor ratios are for the report).

Held-out images are train images no calibration subset uses (``heldout:N:SOURCE``); the test split is only
reported, for the chosen stack. The chosen stack is saved as ``DIR/best`` (an artifact) and, for the ONNX Runtime
and OpenVINO targets, exported to ``DIR/best.onnx``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..artifact import save_artifact
from ..bench import compare, model_runner
from ..config import Config, StrEnum
from ..data import load_data
from ..data.registry import heldout_capacity
from ..errors import ConfigError, UserError
from ..evaluate import accuracy_metrics, predict
from ..export import ExportConfig, export_model
from ..io import atomic_write_json, atomic_write_text
from ..models import data_config
from ..report import write_report
from ..sweep.config import Point, SweepConfig, dense_point, fill_placeholders, make_point, point_id
from ..sweep.run import SweepContext, bench_for, build_point, deploy, point_finished, resolve_base, run_point
from .space import SearchSpace, load_space

PEER = {"peer": "nncf_accuracy_control", "runtime": "openvino"}  # the point NNCF's accuracy control runs as


class Target(StrEnum):
    TORCH = "torch"
    TORCH_COMPILE = "torch-compile"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    CUDA = "cuda"  # torch compiled, with CUDA graphs, on the GPU

    @property
    def runtime(self) -> str:
        return "torch-compile" if self == Target.CUDA else str(self)

    @property
    def exported(self) -> bool:
        return self in (Target.ONNXRUNTIME, Target.OPENVINO)


class Metric(StrEnum):
    TOP1 = "top1"
    AGREEMENT = "agreement"  # no labels needed: the share of images where the compressed model agrees


@dataclasses.dataclass
class SearchConfig(Config):
    """model: a timm id, an artifact, or ``recipe:NAME`` (a bundled training recipe's cached baseline); data: its
    train split gives the calibration and the held-out images, its test split the reported drop. max_drop: points of
    ``metric`` the chosen stack may lose on held-out data. target: where it will run, timed at ``batch_size``.
    budget_minutes: wall-clock for the whole search. space: a search-space YAML (default: the bundled one). heldout /
    heldout_small: held-out images for the full and the first, cheap accuracy check (default: 2,000 and 500, or what
    the train split allows). n_trials: stop after this many trials in all (default: when the budget is spent)."""

    NAME = "search"
    VERSION = 1
    model: str = ""
    data: str = ""
    max_drop: float = 1.0
    metric: Metric = Metric.TOP1
    target: Target = Target.TORCH
    batch_size: int = 64
    budget_minutes: float = 30.0
    space: str | None = None
    heldout: int | None = None
    heldout_small: int | None = None
    calib_size: int = 32
    repeat: int = 5
    seed: int = 0
    n_trials: int | None = None

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("search needs a model and --data")
        if not self.max_drop >= 0:
            raise ConfigError(f"max_drop is the points of accuracy the search may lose, >= 0; got {self.max_drop}")
        if not self.budget_minutes >= 1:
            raise ConfigError(f"budget_minutes {self.budget_minutes} is too small to time the dense model and one "
                              "trial: give at least 1")
        for name in ("batch_size", "repeat", "heldout", "heldout_small", "n_trials"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")


def _require(target: Target) -> None:
    """A one-line refusal when the target runtime is not here."""
    need = {Target.ONNXRUNTIME: "onnxruntime", Target.OPENVINO: "openvino"}.get(target)
    if need and importlib.util.find_spec(need) is None:
        raise ConfigError(f"target {target} needs {need}, which is not installed: pip install 'vitcompress[export]'")
    if target == Target.CUDA and not torch.cuda.is_available():
        raise ConfigError("target cuda needs a CUDA GPU, and torch sees none")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("vitcompress search needs Optuna: pip install 'vitcompress[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sweeps(cfg: SearchConfig, base: dict[str, Any], n_full: int, n_small: int) -> tuple[SweepConfig, SweepConfig]:
    """The sweep settings of the full stage (held-out accuracy and speed) and of the cheap first check."""
    full_spec, small_spec = f"heldout:{n_full}:{cfg.data}", f"heldout:{n_small}:{cfg.data}"
    bench = {"device": "cuda" if cfg.target == Target.CUDA else "cpu", "batch_sizes": [cfg.batch_size],
             "repeat": cfg.repeat, "warmup": 2, "warmup_s": 0.2}
    common = dict(base=base, calib_data=cfg.data, calib_size=cfg.calib_size, bench=bench,
                  title=f"vitcompress search: {cfg.model} on {cfg.target}, batch {cfg.batch_size}")
    full = SweepConfig(eval_data=[full_spec], accuracy=f"{full_spec}:{cfg.metric}", peer_max_drop=cfg.max_drop,
                       **common)
    small = SweepConfig(eval_data=[small_spec], accuracy=f"{small_spec}:{cfg.metric}", speed=False, **common)
    return full, small


def _metric(rec: dict[str, Any], cfg: SearchConfig) -> float:
    return float(next(iter(rec["accuracy"].values()))[str(cfg.metric)])


def _check_out(out: Path) -> None:
    """Refuse a folder that holds something other than a search (never overwrite a user's files)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "search.json").is_file()
                                              and not (out / "study.db").is_file())):
        raise UserError(f"{out} exists and is not a search folder: choose a new --out")


def run_search(cfg: SearchConfig, out: str | Path, *, log=print) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg`` in ``out``; returns the summary written to ``out/search.json``."""
    start = time.monotonic()
    optuna = _optuna()
    _require(cfg.target)
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(cfg.space).for_target(cfg.target.exported)
    space = SearchSpace(fill_placeholders(space.families, {"data": cfg.data}))  # "${data}": the search's own data
    if not space.families:
        raise ConfigError(f"the search space has no option that target {cfg.target} can run")
    base_spec = {"recipe": cfg.model[len("recipe:"):]} if cfg.model.startswith("recipe:") else \
        {"artifact": cfg.model} if Path(cfg.model).is_dir() else {"model": cfg.model}
    probe = SweepConfig(base=base_spec, eval_data=[], speed=True)
    base, base_key = resolve_base(probe, log=log)
    train_len = len(load_data(cfg.data, data_config(base), purpose="train"))
    cap = heldout_capacity(train_len)
    n_full = cfg.heldout or min(2000, cap)
    n_small = cfg.heldout_small or max(1, min(500, n_full // 4))
    full, small = _sweeps(cfg, base_spec, n_full, n_small)
    ctx, ctx_small = SweepContext(base, full), SweepContext(base, small)
    pdir = out / "points"
    anchor, dense = Point("base (uncompressed)", []), dense_point(cfg.target.runtime)
    records = {p.name: _measured(ctx, p, full, base_key, pdir, log) for p in (anchor, dense)}
    base_rec, dense_rec = records[anchor.name], records[dense.name]
    if base_rec.get("status") != "ok" or dense_rec.get("status") != "ok":
        why = dense_rec.get("error") or base_rec.get("error")
        raise UserError(f"the dense model did not run on {cfg.target}: {why}")
    ref_small = _metric(ctx_small.measure(anchor), cfg)
    ref = _metric(base_rec, cfg)
    timer = _Timer(cfg, full, base, ctx.images)
    peer = None
    if cfg.target == Target.OPENVINO and importlib.util.find_spec("nncf") is not None:  # the peer, side by side
        rec = _measured(ctx, make_point("NNCF quantize_with_accuracy_control", PEER), full, base_key, pdir, log)
        if rec.get("status") == "ok":
            peer = {"point": rec["id"], "drop": round(ref - _metric(rec, cfg), 3),
                    "speed": round(timer.speedup(make_point("peer", PEER), "peer")["speedup_vs_dense"], 4)}
    objective = _Objective(cfg, space, ctx, ctx_small, full, base_key, pdir, (ref, ref_small), timer,
                           n_small, float(base_rec.get("gflops") or 0.0), out, log)
    # the drop over budget is a constraint (<= 0 is feasible): Optuna 5 records it on the trial, older ones ask
    modern = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, **({} if modern else {
        "constraints_func": lambda t: [t.user_attrs.get("violation", 0.0)]}))
    # heartbeats: a trial whose process died (a killed search) is failed once its heartbeat is 2 minutes old, by
    # whichever process of this study starts a trial next; live trials of other processes (torchrun ranks) stay
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}", heartbeat_interval=30,
                                             grace_period=120)
    study = optuna.create_study(study_name="search", storage=storage, load_if_exists=True, direction="maximize",
                                sampler=sampler)
    budget = cfg.budget_minutes * 60
    reserve = min(max(30.0, 0.15 * budget), 0.5 * budget)  # the final build, export and test evaluation
    left = budget - (time.monotonic() - start) - reserve
    todo = None if cfg.n_trials is None else max(0, cfg.n_trials - len(study.trials))
    if left > 0 and todo != 0:
        study.optimize(objective, timeout=left, n_trials=todo, catch=(UserError, RuntimeError, ValueError))
    distributed.barrier()  # under torchrun: every rank's trials are in the study before rank 0 chooses
    if distributed.world()[0] != 0:
        return {}
    trials = _trials(study)
    _write_sweep(out, full, base_key)
    return _finish(cfg, out, base, ctx, full, trials, ref, timer, n_full, n_small, start, log, peer)


def _trials(study: Any) -> list[dict[str, Any]]:
    """Every trial's record, from the study (so that ranks sharing it, and resumed runs, see them all)."""
    return [t.user_attrs["entry"] for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if "entry" in t.user_attrs]


def _write_sweep(out: Path, full: SweepConfig, base_key: str) -> None:
    """The sweep index of the measured points (the anchor, the dense target, every fully measured trial), so that the
    sweep's report, Pareto picture and ``vitcompress report`` read the search folder."""
    recs = []
    for f in sorted((out / "points").glob("*.json")):
        try:
            recs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    recs.sort(key=lambda r: (r.get("name", "").startswith("trial"), int(r["name"].split()[1])
                             if r.get("name", "").startswith("trial ") else 0))
    atomic_write_json(out / "sweep.json", {"config": full.to_dict(), "base_key": base_key, "command": None,
                                           "points": [{"id": r["id"], "name": r["name"], "family": r.get("family")}
                                                      for r in recs]})


def _measured(ctx: SweepContext, p: Point, cfg: SweepConfig, base_key: str, pdir: Path, log) -> dict[str, Any]:
    """A point's sweep record: read if finished, else measured now and written."""
    pid = point_id(p, cfg, base_key)
    if point_finished(pdir / f"{pid}.json"):
        return json.loads((pdir / f"{pid}.json").read_text())
    return run_point(ctx, pid, p, pdir, log, lambda *a, **k: None)


class _Objective:
    """One trial: sample a stack, reject it cheaply if it cannot make the budget, else measure it in full."""

    def __init__(self, cfg: SearchConfig, space: SearchSpace, ctx: SweepContext, ctx_small: SweepContext,
                 full: SweepConfig, base_key: str, pdir: Path, refs: tuple[float, float], timer: _Timer,
                 n_small: int, base_gflops: float, out: Path, log):
        self.cfg, self.space, self.ctx, self.ctx_small, self.full = cfg, space, ctx, ctx_small, full
        self.base_key, self.pdir, (self.ref, self.ref_small) = base_key, pdir, refs
        self.timer, self.n_small, self.base_gflops = timer, n_small, base_gflops
        self.speeds: dict[str, float] = {}  # point id -> side-by-side speed-up (a repeated sample is not re-timed)
        self.out, self.log = out, log

    def __call__(self, trial: Any) -> float:
        stack = self.space.sample(trial)
        entry: dict[str, Any] = {"trial": trial.number, "stack": stack}
        try:
            return self._run(trial, stack, entry)
        finally:
            trial.set_user_attr("entry", entry)  # the study holds the record: resumes and other ranks see it

    def _run(self, trial: Any, stack: list[dict[str, Any]], entry: dict[str, Any]) -> float:
        pruned = _optuna().TrialPruned
        if not stack:
            entry.update(stage="dense", drop=0.0, speed=1.0)
            _constrain(trial, 0.0)
            return 1.0
        point = make_point(f"trial {trial.number}", {"stack": stack, "runtime": self.cfg.target.runtime})
        small = self.ctx_small.measure(point)
        drop_small = self.ref_small - _metric(small, self.cfg)
        p = min(max(_metric(small, self.cfg) / 100, 1e-3), 1 - 1e-3)
        se = 100 * math.sqrt(p * (1 - p) / self.n_small)
        entry.update(drop_small=round(drop_small, 3), gflops=small.get("gflops"), size_mb=small.get("size_mb"))
        if drop_small > self.cfg.max_drop + 2 * se:
            entry["stage"] = f"rejected: small held-out drop {drop_small:.2f} > {self.cfg.max_drop} + 2 SE"
            raise pruned(entry["stage"])
        if self.base_gflops and float(small.get("gflops") or self.base_gflops) >= 0.99 * self.base_gflops and \
                not any(s.get("name") in ("quantize", "mixed_precision") for s in stack):
            entry["stage"] = "rejected: removes no work"
            raise pruned(entry["stage"])
        rec = _measured(self.ctx, point, self.full, self.base_key, self.pdir, self.log)
        if rec.get("status") != "ok":
            entry["stage"] = f"failed: {rec.get('error')}"
            raise pruned(entry["stage"])
        drop = self.ref - _metric(rec, self.cfg)
        if rec["id"] not in self.speeds:
            self.speeds[rec["id"]] = self.timer.speedup(point)["speedup_vs_dense"]
        speed = self.speeds[rec["id"]]
        violation = max(0.0, drop - self.cfg.max_drop)
        _constrain(trial, violation)
        entry.update(stage="measured", point=rec["id"], drop=round(drop, 3), speed=round(speed, 4),
                     feasible=violation == 0)
        return speed


class _Timer:
    """Times a stack in the target runtime alternately with the target's dense model, in this process, at the batch
    size: the speed-up the search maximises (contention and drift hit both sides alike; the shared-anchor ratio of
    the sweep record is for the report)."""

    def __init__(self, cfg: SearchConfig, full: SweepConfig, base: Any, images: Any):
        self.cfg, self.full, self.base, self.images = cfg, full, base, images
        self.bench, self.size = full.bench_config(), data_config(base)["input_size"]
        self.repeat = max(3 * cfg.repeat, 15)
        self._tmp = tempfile.TemporaryDirectory(prefix="vitcompress-search-")
        self._kept: dict[str, Any] = {}
        self.dense = self._runner(dense_point(cfg.target.runtime), "dense")

    def _runner(self, p: Point, key: str) -> Any:
        if key in self._kept:
            return self._kept[key]
        work = Path(self._tmp.name) / key
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        model = deploy(build_point(self.base, p.stack, self.full), p, self.full, work)
        run = model_runner(model, self.cfg.batch_size, self.size, bench_for(p, self.full), self.images)
        if key != "trial":  # the dense model and the peer are timed again at the end: built once
            self._kept[key] = run
        return run

    def speedup(self, p: Point, key: str = "trial") -> dict[str, float]:
        r = compare(self.dense, self._runner(p, key), device=self.bench.resolve_device(), warmup=self.bench.warmup,
                    warmup_s=self.bench.warmup_s, repeat=self.repeat)
        return {"speedup_vs_dense": r["speedup"], "median_ms": r["b_median_ms"], "dense_median_ms": r["a_median_ms"]}


def _side_by_side(cfg: SearchConfig, timer: _Timer, stack: list[dict[str, Any]], with_peer: bool,
                  ) -> dict[str, Any]:
    """The chosen stack (and the peer, when there is one) timed again alternately with the target's dense model:
    the reported speed-ups."""
    out: dict[str, Any] = {"batch_size": cfg.batch_size, "repeat": timer.repeat,
                           "best": timer.speedup(make_point("best", {"stack": stack, "runtime": cfg.target.runtime}),
                                                 "best")}
    if with_peer:
        out["peer"] = timer.speedup(make_point("peer", PEER), "peer")
        out["best_vs_peer"] = out["best"]["speedup_vs_dense"] / out["peer"]["speedup_vs_dense"]
    return out


def _constrain(trial: Any, violation: float) -> None:
    trial.set_user_attr("violation", violation)
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("drop_over_budget", violation)


def _finish(cfg: SearchConfig, out: Path, base: Any, ctx: SweepContext, full: SweepConfig, trials: list[dict[str, Any]],
            ref: float, timer: _Timer, n_full: int, n_small: int, start: float, log,
            peer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose, save and export the best feasible stack; score it on the test split; write the summary and report."""
    feasible = [t for t in trials if t.get("feasible")]
    best = max(feasible, key=lambda t: (t["speed"], -t["drop"]), default=None)
    summary: dict[str, Any] = {"config": cfg.to_dict(), "heldout": n_full, "heldout_small": n_small,
                               "reference": {"heldout": ref},
                               "trials": trials, "chosen": best, "peer": peer}
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
        summary["side_by_side"] = _side_by_side(cfg, timer, best["stack"], peer is not None)
        test = load_data(cfg.data, data_config(base))
        metric = str(cfg.metric)
        b_logits, labels, _ = predict(base, test, cfg=ctx.bench)
        c_logits, _, _ = predict(model, test, cfg=ctx.bench)
        got, want = accuracy_metrics(c_logits, labels, b_logits), accuracy_metrics(b_logits, labels, b_logits)
        summary["test"] = {"images": len(test), metric: got.get(metric), "base": want.get(metric),
                           "drop": None if got.get(metric) is None else want[metric] - got[metric],
                           "agreement": got.get("agreement")}
    summary["seconds"] = round(time.monotonic() - start, 1)
    atomic_write_json(out / "search.json", summary)
    atomic_write_text(out / "search.md", _markdown(summary))
    write_report(out)
    sbs = summary.get("side_by_side") or {}
    line = (f"search: no stack met a held-out drop of {cfg.max_drop} on {cfg.target}; the dense model stays"
            if best is None else
            f"search: {sbs['best']['speedup_vs_dense']:.2f}x the dense {cfg.target} model at batch {cfg.batch_size} "
            f"(side by side); held-out drop {best['drop']:.2f} pt, test drop {summary['test']['drop']:.2f} pt; "
            f"{out / 'best'}" + (f", {out / 'best.onnx'}" if cfg.target.exported else "")
            + (f"; NNCF accuracy control: {sbs['peer']['speedup_vs_dense']:.2f}x (held-out drop {peer['drop']:.2f} "
               f"pt): ours {sbs['best_vs_peer']:.2f}x its speed" if peer and "peer" in sbs else ""))
    log(line)
    summary["line"] = line
    atomic_write_json(out / "search.json", summary)
    return summary


def _markdown(s: dict[str, Any]) -> str:
    cfg = s["config"]
    rows = ["| trial | stack | stage | small held-out drop | held-out drop | x best dense |",
            "|---:|---|---|---:|---:|---:|"]
    chosen = (s.get("chosen") or {}).get("trial")
    for t in s["trials"]:
        stack = " + ".join(", ".join(f"{k}={v}" for k, v in step.items()) for step in t["stack"]) or "dense"
        mark = " **chosen**" if t["trial"] == chosen else ""
        rows.append(f"| {t['trial']}{mark} | {stack} | {t.get('stage', '')} | {t.get('drop_small', '')} | "
                    f"{t.get('drop', '')} | {t.get('speed', '')} |")
    test = s.get("test") or {}
    peer = s.get("peer")
    rows.append("")
    sbs = s.get("side_by_side") or {}
    if "best" in sbs:
        rows.append(f"Timed side by side with the dense {cfg['target']} model at batch {sbs['batch_size']} "
                    f"({sbs['repeat']} alternating runs): the chosen stack {sbs['best']['speedup_vs_dense']:.2f}x"
                    + (f", NNCF quantize_with_accuracy_control (max drop {cfg['max_drop']} pt, held-out drop "
                       f"{peer['drop']} pt) {sbs['peer']['speedup_vs_dense']:.2f}x: ours {sbs['best_vs_peer']:.2f}x "
                       "its speed." if peer and "peer" in sbs else "."))
        rows.append("The x best dense column ranks the trials (each timed against the shared torch anchor).")
    return "\n".join([
        f"# vitcompress search: {cfg['model']} on {cfg['target']}, batch {cfg['batch_size']}", "",
        f"Budget {cfg['budget_minutes']} min (took {s['seconds']} s); max {cfg['metric']} drop {cfg['max_drop']} pt "
        f"on {s['heldout']} held-out train images (first check on {s['heldout_small']}); the test split is only "
        "reported.", "",
        f"Chosen: trial {chosen}" + (f", test drop {test.get('drop'):.2f} pt on {test.get('images')} images"
                                      if test.get("drop") is not None else "") if chosen is not None else
        "No trial met the budget.", "", *rows, ""])

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

Held-out images are train images no calibration subset uses (``heldout:N:SOURCE``, at least 1,000 unless the
source has fewer); the test split is only reported, for the chosen stack. The chosen stack is saved as ``DIR/best``
(an artifact) and, for the ONNX Runtime and OpenVINO targets, exported to ``DIR/best.onnx``.

One number per quantity: each point is timed once, by :class:`~.timing.Timer`, and that figure is written into its sweep
record, so ``search.md``, ``search.json``, ``report.md``, ``points.csv`` and ``pareto.png`` all read it. A stack
already measured (by this or another process of the study) is not measured again. The study lives in
``--storage`` (SQLite in ``DIR/study.db`` by default; a PostgreSQL or MySQL URL lets ``--worker`` processes on
other machines join it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..data import load_data
from ..data.registry import heldout_capacity
from ..errors import ConfigError, UserError, note
from ..export import Runtime
from ..io import atomic_write_json
from ..models import data_config
from ..sweep.config import Point, SweepConfig, dense_point, fill_placeholders, make_point, point_id
from ..sweep.run import SweepContext, point_finished, resolve_base, run_point
from ..ui import resumable
from .config import SearchConfig, point_runtime
from .space import SearchSpace, load_space
from .study import finished_trials, open_study, optuna_module, wait_for_others, write_sweep_index
from .summary import finish
from .timing import Timer

PEER = {"peer": "nncf_accuracy_control", "runtime": "openvino"}  # the point NNCF's accuracy control runs as


def _require(target: Runtime) -> None:
    """A one-line refusal when the target runtime is not here."""
    need = {Runtime.ONNXRUNTIME: "onnxruntime", Runtime.OPENVINO: "openvino"}.get(target)
    if need and importlib.util.find_spec(need) is None:
        raise ConfigError(f"target {target} needs {need}, which is not installed: pip install 'vitcompress[export]'")
    if target == Runtime.CUDA and not torch.cuda.is_available():
        raise ConfigError("target cuda needs a CUDA GPU, and torch sees none")


def _sweeps(cfg: SearchConfig, base: dict[str, Any], n_full: int, n_small: int) -> tuple[SweepConfig, SweepConfig]:
    """The sweep settings of the full stage (held-out accuracy and speed) and of the cheap first check."""
    full_spec, small_spec = f"heldout:{n_full}:{cfg.data}", f"heldout:{n_small}:{cfg.data}"
    bench = {"device": "cuda" if cfg.target == Runtime.CUDA else "cpu", "batch_sizes": [cfg.batch_size],
             "repeat": cfg.repeat, "warmup": 2, "warmup_s": 0.2}
    common = dict(base=base, calib_data=cfg.data, calib_size=cfg.calib_size, bench=bench,
                  title=f"vitcompress search: {cfg.model} on {cfg.target}, batch {cfg.batch_size}")
    full = SweepConfig(eval_data=[full_spec], accuracy=f"{full_spec}:{cfg.metric}", peer_max_drop=cfg.max_drop,
                       speed=False, **common)
    small = SweepConfig(eval_data=[small_spec], accuracy=f"{small_spec}:{cfg.metric}", speed=False, **common)
    return full, small


def _metric(rec: dict[str, Any], cfg: SearchConfig) -> float:
    return float(next(iter(rec["accuracy"].values()))[str(cfg.metric)])


MARKER = "search-config.json"  # written first: marks the folder as a search's
MIN_HELDOUT = 1000  # below this, one image moves the drop by more than 0.1 pt
DEFAULT_HELDOUT = 2000


def split_se(p: float, n: int) -> float:
    """One standard error, in points, of a metric measured at ``p`` % on ``n`` images (at least one image's worth,
    so that a metric at 100 % still has a resolution)."""
    q = min(max(p / 100, 0.0), 1.0)
    return max(100 * math.sqrt(q * (1 - q) / n), 100 / n)


def drop_se(agreement: float | None, n: int) -> float | None:
    """The standard error of a paired drop on ``n`` images: only images where the two models disagree can change
    the count, so sqrt(d (1 - d) / n) with d the disagreement rate bounds it."""
    if agreement is None:
        return None
    d = min(max(1 - agreement / 100, 0.0), 1.0)
    return 100 * math.sqrt(d * (1 - d) / n)


def _check_out(out: Path) -> None:
    """Refuse a folder that holds something other than a search (never overwrite a user's files)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any(
            (out / f).is_file() for f in ("search.json", "study.db", MARKER)))):
        raise UserError(f"{out} exists and is not a search folder: choose a new --out")


def run_search(cfg: SearchConfig, out: str | Path, *, log=print) -> dict[str, Any]:
    """Run (or resume, or with ``cfg.worker`` join) the search of ``cfg`` in ``out``; returns the summary written to
    ``out/search.json`` (``{}`` in a worker, which leaves choosing to the main process)."""
    start = time.monotonic()
    optuna = optuna_module()
    _require(cfg.target)
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, cfg.to_dict())  # the folder is a search's from now on (a refusal may follow)
    space = load_space(cfg.space).for_target(cfg.target.exported)
    space = SearchSpace(fill_placeholders(space.families, {"data": cfg.data}))  # "${data}": the search's own data
    if not space.families:
        raise ConfigError(f"the search space has no option that target {cfg.target} can run")
    base_spec = {"recipe": cfg.model[len("recipe:"):]} if cfg.model.startswith("recipe:") else \
        {"artifact": cfg.model} if Path(cfg.model).is_dir() else {"model": cfg.model}
    probe = SweepConfig(base=base_spec, eval_data=[], speed=True)
    base, base_key = resolve_base(probe, log=log)
    n_full, n_small = _heldout_sizes(cfg, len(load_data(cfg.data, data_config(base), purpose="train")))
    full, small = _sweeps(cfg, base_spec, n_full, n_small)
    kept = {"logits_cache": out / "base_logits", "base_key": base_key}  # a resumed search skips the base's evals
    ctx, ctx_small = SweepContext(base, full, **kept), SweepContext(base, small, **kept)
    pdir = out / "points"
    anchor, dense = Point("base (uncompressed)", []), dense_point(point_runtime(cfg.target))
    t0 = time.monotonic()
    ref_small = _metric(ctx_small.measure(anchor), cfg)
    per_image = (time.monotonic() - t0) / n_small  # what one image's evaluation costs: the budget's estimates
    records = {p.name: _measured(ctx, p, full, base_key, pdir, log) for p in (anchor, dense)}
    base_rec, dense_rec = records[anchor.name], records[dense.name]
    if base_rec.get("status") != "ok" or dense_rec.get("status") != "ok":
        why = dense_rec.get("error") or base_rec.get("error")
        raise UserError(f"the dense model did not run on {cfg.target}: {why}")
    ref = _metric(base_rec, cfg)
    se = split_se(ref, n_full)
    if cfg.max_drop < 2 * se:
        need = math.ceil(n_full * (2 * se / max(cfg.max_drop, 1e-9)) ** 2) if cfg.max_drop > 0 else None
        raise ConfigError(f"--max-drop {cfg.max_drop} is below two standard errors ({2 * se:.2f} pt) of {n_full} "
                          f"held-out images at {ref:.1f} % {cfg.metric}: give --max-drop {2 * se:.2f} or more"
                          + (f", or --heldout {need}" if need else ""))
    timer = Timer(cfg, full, base, ctx.images)
    base_rec = timer.record(anchor, base_rec, pdir, key="anchor")
    timer.record(dense, dense_rec, pdir, self_anchor=True)
    peer = None
    if cfg.target == Runtime.OPENVINO and importlib.util.find_spec("nncf") is not None:  # the peer, side by side
        rec = _measured(ctx, make_point("NNCF quantize_with_accuracy_control", PEER), full, base_key, pdir, log)
        if rec.get("status") == "ok":
            timer.record(make_point("peer", PEER), rec, pdir, key="peer")
            peer = {"point": rec["id"], "drop": round(ref - _metric(rec, cfg), 3),
                    "speed": round(rec["speedup"][str(cfg.batch_size)], 4)}
    budget = cfg.budget_minutes * 60
    test_len = len(load_data(cfg.data, data_config(base)))
    # the final build, export and the test split through the base and the chosen stack
    reserve = 0.0 if cfg.worker else 15.0 + 2.2 * test_len * per_image
    deadline = start + budget - reserve
    objective = _Objective(cfg, space, ctx, ctx_small, full, base_key, pdir, (ref, ref_small), timer,
                           (n_full, n_small), float(base_rec.get("gflops") or 0.0), log,
                           first_estimate=1.5 * (n_full + n_small) * per_image + timer.seconds)
    study = open_study(optuna, cfg, out)
    if objective.worth_starting(deadline) and (cfg.n_trials is None or len(study.trials) < cfg.n_trials):
        stop = [objective.stop_if_late(deadline)]
        if cfg.n_trials is not None:  # all processes' trials count
            stop.append(optuna.study.MaxTrialsCallback(cfg.n_trials, states=None))
        where = cfg.storage or out / "study.db"
        with resumable(lambda: f"{len(finished_trials(study))} trials are kept in the study ({where})"):
            study.optimize(objective, timeout=max(deadline - time.monotonic(), 1.0), callbacks=stop,
                           catch=(UserError, RuntimeError, ValueError))
    distributed.barrier()  # under torchrun: every rank's trials are in the study before rank 0 chooses
    if distributed.world()[0] != 0 or cfg.worker:
        return {}
    wait_for_others(study, start + budget, log)
    trials = finished_trials(study)
    write_sweep_index(out, full, base_key, study, cfg)
    return finish(cfg, out, base, ctx, full, trials, ref, timer, (n_full, n_small), start, log, peer)


def _heldout_sizes(cfg: SearchConfig, train_len: int) -> tuple[int, int]:
    """The full and the first check's held-out sizes: at least :data:`MIN_HELDOUT` images by default, or all the
    train split can spare (with a warning)."""
    cap = heldout_capacity(train_len)
    n_full = cfg.heldout or min(DEFAULT_HELDOUT, cap)
    if cfg.heldout is None and cap < MIN_HELDOUT:
        note(f"only {cap} train images are held out from calibration: the drop is measured on {cap} images "
             f"(one image = {100 / cap:.2f} pt)")
    return n_full, cfg.heldout_small or max(1, min(500, n_full // 4))


def _measured(ctx: SweepContext, p: Point, cfg: SweepConfig, base_key: str, pdir: Path, log) -> dict[str, Any]:
    """A point's sweep record: read if finished, else measured now and written."""
    pid = point_id(p, cfg, base_key)
    if point_finished(pdir / f"{pid}.json"):
        return json.loads((pdir / f"{pid}.json").read_text())
    return run_point(ctx, pid, p, pdir, log, lambda *a, **k: None)


def _stack_key(stack: list[dict[str, Any]]) -> str:
    return json.dumps(stack, sort_keys=True, default=str)


class _Objective:
    """One trial: sample a stack, reuse it if the study measured it already, reject it cheaply if it cannot make the
    budget, else measure it in full."""

    def __init__(self, cfg: SearchConfig, space: SearchSpace, ctx: SweepContext, ctx_small: SweepContext,
                 full: SweepConfig, base_key: str, pdir: Path, refs: tuple[float, float], timer: Timer,
                 sizes: tuple[int, int], base_gflops: float, log, *, first_estimate: float):
        self.cfg, self.space, self.ctx, self.ctx_small, self.full = cfg, space, ctx, ctx_small, full
        self.base_key, self.pdir, (self.ref, self.ref_small) = base_key, pdir, refs
        self.timer, (self.n_full, self.n_small), self.base_gflops = timer, sizes, base_gflops
        self.log = log
        self.longest = first_estimate  # the longest trial so far: the next one may take as long

    def worth_starting(self, deadline: float) -> bool:
        return deadline - time.monotonic() >= self.longest

    def stop_if_late(self, deadline: float) -> Any:
        def callback(study: Any, trial: Any) -> None:
            if not self.worth_starting(deadline):  # a trial that would overrun the budget is not started
                study.stop()
        return callback

    def __call__(self, trial: Any) -> float:
        t0 = time.monotonic()
        stack = self.space.sample(trial)
        entry: dict[str, Any] = {"trial": trial.number, "stack": stack}
        trial.set_user_attr("entry", {**entry, "stage": "running"})  # claims the stack for other processes
        try:
            return self._run(trial, stack, entry)
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 1)
            if "repeat_of" not in entry:
                self.longest = max(self.longest, entry["seconds"])
            trial.set_user_attr("entry", entry)  # the study holds the record: resumes and other processes see it

    def _prior(self, trial: Any, stack: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The entry of an earlier trial of the study with the same stack (waiting while another process measures
        it), else None."""
        running = optuna_module().trial.TrialState.RUNNING
        key = _stack_key(stack)
        while True:
            same = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number
                    and "entry" in t.user_attrs and _stack_key(t.user_attrs["entry"]["stack"]) == key]
            done = [t for t in same if t.user_attrs["entry"].get("stage") != "running"]
            if done:
                return min(done, key=lambda t: t.number).user_attrs["entry"]
            if not any(t.state == running for t in same):
                return None
            time.sleep(2)

    def _run(self, trial: Any, stack: list[dict[str, Any]], entry: dict[str, Any]) -> float:
        pruned = optuna_module().TrialPruned
        prior = self._prior(trial, stack)
        if prior is not None:  # measured already: the same figures, not a second measurement
            entry.update({k: v for k, v in prior.items() if k not in ("trial", "seconds", "repeat_of")},
                         repeat_of=prior.get("repeat_of", prior["trial"]))
            if entry.get("stage") not in ("measured", "dense"):
                raise pruned(entry.get("stage"))
            _constrain(trial, max(0.0, entry["drop"] - self.cfg.max_drop))
            return entry["speed"]
        if not stack:
            entry.update(stage="dense", drop=0.0, speed=1.0)
            _constrain(trial, 0.0)
            return 1.0
        point = make_point(f"trial {trial.number}", {"stack": stack, "runtime": point_runtime(self.cfg.target)})
        small = self.ctx_small.measure(point)
        drop_small = self.ref_small - _metric(small, self.cfg)
        se = split_se(_metric(small, self.cfg), self.n_small)
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
        rec = self.timer.record(point, rec, self.pdir)
        trial.set_user_attr("record", rec)  # for the main process's report, when this one is a worker
        drop = self.ref - _metric(rec, self.cfg)
        speed = rec["speedup"][str(self.cfg.batch_size)]
        violation = max(0.0, drop - self.cfg.max_drop)
        _constrain(trial, violation)
        agreement = next(iter(rec["accuracy"].values())).get("agreement")
        entry.update(stage="measured", point=rec["id"], drop=round(drop, 3), speed=round(speed, 4),
                     drop_se=None if agreement is None else round(drop_se(agreement, self.n_full), 3),
                     feasible=violation == 0)
        return speed


def _constrain(trial: Any, violation: float) -> None:
    trial.set_user_attr("violation", violation)
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("drop_over_budget", violation)

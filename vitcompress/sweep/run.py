"""Running a sweep: every unfinished point measured once, its record written atomically as soon as it is done.

Each finished point is written to ``DIR/points/<id>.json``; the id hashes the point and every setting that changes
its numbers, so a re-run skips finished points and a crash or Ctrl-C loses none. A point that fails is recorded
with its error and the sweep goes on. Workers sharing one folder (``torchrun``, or several processes) split the
points through advisory locks. The report (:mod:`vitcompress.report`) is written at the end.

Every point is timed alternately with the same anchor, the base in torch at the sweep's bench settings, so that
speed-ups between any two points (the fastest dense baseline and a compressed export, say) are ratios of ratios
measured side by side.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..artifact import WEIGHTS, read_manifest
from ..bench import BenchConfig, Dtype, compare, model_runner, peak_memory_mb
from ..data import load_data
from ..errors import ConfigError, UserError
from ..evaluate import accuracy_dtype, accuracy_metrics, predict, predict_traced, static_metrics
from ..export import ExportConfig, RuntimeModel, export_model, load_runtime_model
from ..export.peers import peer_model
from ..io import atomic_write_json, atomic_write_text, cached_tensors, file_lock
from ..models import data_config, model_info
from ..pipeline import Calibration, apply_stack, calibration_batches, create_model
from ..provenance import run_context
from ..report import write_report
from ..robustness import AttackConfig, AttackSource, attack_eval
from ..train import baseline
from ..transforms import config_from_dict
from ..ui import progress_bar, resumable
from .config import Point, Runtime, SweepConfig, expand, load_sweep, point_id


def resolve_base(cfg: SweepConfig, *, progress: bool = False, log=print) -> tuple[nn.Module, str]:
    """The base model and a key identifying it (for point ids)."""
    b = cfg.base
    if "recipe" in b or "artifact" in b:
        overrides = {k: v for k, v in b.items() if k != "recipe"}  # e.g. {data: ..., checkpoint: ...}
        path = baseline(b["recipe"], overrides=overrides, progress=progress, log=log) if "recipe" in b \
            else Path(b["artifact"])
        return create_model(str(path)), f"artifact:{read_manifest(path)['files'][WEIGHTS]['sha256']}"
    model = create_model(b["model"], pretrained=bool(b.get("pretrained")), checkpoint=b.get("checkpoint"),
                         **(b.get("kwargs") or {}))
    if not b.get("pretrained") and not b.get("checkpoint"):  # speed studies may; the reports say so
        model_info(model).provenance["random_weights"] = True
    return model, json.dumps(b, sort_keys=True)


def build_point(model: nn.Module, stack: list[dict[str, Any]], cfg: SweepConfig, *, train: bool = True) -> nn.Module:
    """A copy of ``model`` with ``stack`` applied (recovery distils from ``model``; skipped unless ``train``)."""
    return apply_stack(copy.deepcopy(model), stack, calib=Calibration(cfg.calib_data, cfg.calib_size),
                       teacher=model if train else None, train=train)


def deploy(model: nn.Module, point: Point, cfg: SweepConfig, workdir: Path) -> nn.Module:
    """``model`` (the point's stack applied) as it runs in the point's runtime: itself for torch, else its ONNX
    export (or the peer tool's model) loaded in ONNX Runtime or OpenVINO from ``workdir``."""
    runtime = point.runs_in(cfg)
    if point.peer is not None:
        calib = [x.numpy() for x, _, _ in calibration_batches(model, Calibration(cfg.calib_data, cfg.calib_size))]
        return peer_model(point.peer, model, calib, workdir, runtime, validation=_validation(model, cfg),
                          max_drop=cfg.peer_max_drop)
    if not runtime.exported:
        return model
    path = workdir / "model.onnx"
    export_model(model, path, ExportConfig.from_dict(point.export or {}))
    return load_runtime_model(path, runtime)


def _validation(model: nn.Module, cfg: SweepConfig) -> list[tuple[Any, Any]]:
    """An accuracy-control peer's validation batches: the first eval data with its labels, or (accuracy by
    agreement, no labels needed) the dense model's own predictions as labels."""
    if not cfg.eval_data:
        return []
    data = load_data(cfg.eval_data[0], data_config(model), limit=cfg.eval_limit)
    agreement = cfg.accuracy.endswith(":agreement")
    out = []
    for x, y, _ in data.loader(64):
        if agreement:
            with torch.inference_mode():
                y = model.eval()(x).argmax(-1)
        out.append((x.numpy(), y.numpy()))
    return out


def bench_for(point: Point, cfg: SweepConfig) -> BenchConfig:
    """The timing and accuracy settings of ``point``: an exported model runs float32 on the CPU; torch-compile
    compiles; a point's dtype replaces the sweep's."""
    bench, runtime = cfg.bench_config(), point.runs_in(cfg)
    if runtime.exported:
        return dataclasses.replace(bench, device="cpu", dtype=Dtype.FP32, compile=False)
    return dataclasses.replace(bench, compile=runtime == Runtime.TORCH_COMPILE,
                               dtype=point.dtype or bench.dtype)


# ---------------------------------------------------------------------------------------------- running
class SweepContext:
    """What every point is measured against: the base's data, logits and speed runners (built once)."""

    def __init__(self, base: nn.Module, cfg: SweepConfig, *, progress: bool = False, logits_cache: Path | None = None,
                 base_key: str | None = None):
        """progress: show each evaluation's progress (images done, rate, ETA). logits_cache: a folder where the
        base's logits are kept (keyed by ``base_key``, the data and the bench settings), so that a resumed sweep does
        not evaluate the base again (minutes on a real model)."""
        self.cfg, self.base, self.bench, self.rank = cfg, base, cfg.bench_config(), distributed.world()[0]
        self.progress = progress
        dcfg = data_config(base)
        self.data = {s: load_data(s, dcfg, limit=cfg.eval_limit) for s in cfg.eval_data}
        self.base_logits = {s: self._base_logits(s, d, logits_cache, base_key) for s, d in self.data.items()}
        sm = cfg.speed_model
        self.speed_base = base if sm is None else create_model(sm["model"], **(sm.get("kwargs") or {}))
        size = data_config(self.speed_base)["input_size"]
        self.base_runs = {bs: model_runner(self.speed_base, bs, size, self.bench)
                          for bs in (self.bench.batch_sizes if cfg.speed else ())}
        first = next(iter(self.data.values()), None)
        self.attack_data = load_data(cfg.eval_data[0], dcfg, limit=cfg.attack_limit) if cfg.attacks() else None
        self.images = next(iter(first.loader(max(self.bench.batch_sizes))))[0] \
            if cfg.speed_model is None and first is not None and len(first) else None  # for content-dependent models
        if self.images is not None and self.images.dim() == 5:  # video clips: their frames, as separate images
            self.images = self.images.flatten(0, 1)

    def _base_logits(self, spec: str, data: Any, cache: Path | None, base_key: str | None) -> torch.Tensor:
        """The base's logits [N, K] on ``data``: read from ``cache`` when a run computed them before."""
        if cache is None or base_key is None:
            return predict(self.base, data, cfg=self.bench, progress=self.progress)[0]
        key = json.dumps([base_key, spec, self.cfg.eval_limit, len(data), self.bench.to_dict()], sort_keys=True,
                         default=str)
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        return cached_tensors(path, lambda: {"logits": predict(self.base, data, cfg=self.bench,
                                                                progress=self.progress)[0].float()})[0]["logits"]

    def measure(self, point: Point) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="vitcompress-point-") as tmp:  # exports live as long as the point
            return self._measure(point, Path(tmp))

    def _measure(self, point: Point, tmp: Path) -> dict[str, Any]:
        cfg, bench = self.cfg, bench_for(point, self.cfg)
        built = build_point(self.base, point.stack, cfg)
        (tmp / "eval").mkdir()
        model = deploy(built, point, cfg, tmp / "eval")
        out: dict[str, Any] = {"runtime": str(point.runs_in(cfg)), "accuracy": {}}
        tokens = {}
        for spec, data in self.data.items():
            d = data if data_config(model) == data_config(self.base) else data.for_config(data_config(model))
            logits, labels, _, tokens[spec] = predict_traced(model, d, cfg=bench, progress=self.progress)
            out["accuracy"][spec] = accuracy_metrics(logits, labels, self.base_logits[spec])
        if self.data:  # what the accuracy passes ran in (auto resolves per model and batch shape)
            out["accuracy_dtype"] = str(accuracy_dtype(model, d, 64, bench))
        if self.attack_data is not None:
            out["robustness"] = self.robustness(model)
        fast = model
        if cfg.speed_model is not None:
            (tmp / "speed").mkdir()
            fast = deploy(build_point(self.speed_base, point.stack, cfg, train=False), point, cfg, tmp / "speed")
        out.update(static_metrics(fast))
        first = next(iter(tokens.values()), None)
        if first is not None:  # adaptive token counts: the GFLOPs are the mean per image of the first eval data
            out.update(tokens=tokens, gflops=first["gflops_mean"], gmacs=first["gflops_mean"] / 2)
        if cfg.speed:
            out.update(self.speed(fast, bench))
        out["random_weights"] = bool(model_info(self.base).provenance.get("random_weights"))
        bits = mean_weight_bits(built)
        if bits is not None:  # several quantize steps over different layers: the mean the model really has
            out["report"] = {**point.report, "w_bits": bits}
        out["transforms"] = [{k: v for k, v in t.items() if k != "state"} for t in built.vitcompress_info.transforms]
        out["recovery_record"] = built.vitcompress_info.provenance.get("recovery")
        out["training_record"] = built.vitcompress_info.provenance.get("learned_merge")
        return out

    def speed(self, fast: nn.Module, bench: BenchConfig) -> dict[str, Any]:
        """Latency per batch size, each timed alternately with the base (the anchor), throughput and peak memory."""
        size = data_config(fast)["input_size"]
        images = self.images if data_config(fast) == data_config(self.base) else None
        out: dict[str, Any] = {"latency_ms": {}, "base_latency_ms": {}, "speedup": {}, "dtype": {}}
        for bs, base_run in self.base_runs.items():
            run = model_runner(fast, bs, size, bench, images)
            r = compare(base_run, run, device=bench.resolve_device(), warmup=bench.warmup, warmup_s=bench.warmup_s,
                        repeat=bench.repeat)
            out["latency_ms"][str(bs)] = {"median": r["b_median_ms"], "p95": r["b_p95_ms"]}
            out["base_latency_ms"][str(bs)] = r["a_median_ms"]
            out["speedup"][str(bs)] = r["speedup"]
            out["dtype"][str(bs)] = str(run.dtype)  # what ran (auto resolved for this model and batch)
        ref = self.cfg.ref_batch
        out["base_dtype"] = {str(bs): str(run.dtype) for bs, run in self.base_runs.items()}
        out["throughput"] = ref / (out["latency_ms"][str(ref)]["median"] / 1e3)
        # a runtime's own allocator is invisible to torch's counters: no peak memory rather than a wrong one
        out["peak_mem_mb"] = None if isinstance(fast, RuntimeModel) else peak_memory_mb(fast, ref, size, bench)
        return out

    def robustness(self, model: nn.Module) -> dict[str, Any]:
        """Each attack of the recipe on the point: ``{label: attack_eval result}``."""
        out: dict[str, Any] = {}
        if isinstance(model, RuntimeModel):  # no autograd through an exported file
            return {attack_label(a): {"error": "an exported model has no gradient"} for a in self.cfg.attacks()}
        same = data_config(model) == data_config(self.base)
        data = self.attack_data if same else self.attack_data.for_config(data_config(model))
        for a in self.cfg.attacks():
            if a.source == AttackSource.BASE and not same:
                out[attack_label(a)] = {"error": "the input size changed: the base's images do not transfer"}
                continue
            out[attack_label(a)] = attack_eval(model, data, a, base=self.base, bench=self.bench)
        return out


def attack_label(a: AttackConfig) -> str:
    """e.g. ``pgd 2/255 base``."""
    eps = Fraction(a.eps).limit_denominator(1000)
    return f"{a.method} {eps.numerator}/{eps.denominator} {a.source}" if eps else f"{a.method} 0 {a.source}"


def point_finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _claim(pdir: Path, pid: str, wait: bool, since: float) -> Iterator[bool]:
    """Claim point ``pid`` for this process (an advisory lock on ``.locks/<id>.lock``): yields whether it is ours to
    run, False when another worker holds it (``wait=False``), finished it, or failed it since this worker started
    (``since``, a time.time(): a failure from an earlier run is retried, one from a sibling worker is not).
    Workers sharing one sweep folder thus split its points instead of computing each one twice."""
    locks = pdir.parent / ".locks"  # beside the points, ignored by git (a sweep folder is often committed)
    if not (locks / ".gitignore").is_file():
        atomic_write_text(locks / ".gitignore", "*\n")
    with file_lock(locks / f"{pid}.lock", wait=wait) as held:
        yield held and not point_finished(pdir / f"{pid}.json") and not _failed_by_sibling(pdir / f"{pid}.json", since)


def _failed_by_sibling(path: Path, since: float) -> bool:
    """Whether the record at ``path`` is a failure another worker process wrote after this one started (not to be
    retried now; a failure from an earlier run, or from this process, is)."""
    try:
        rec = json.loads(path.read_text())
        return rec.get("pid") != os.getpid() and path.stat().st_mtime >= since
    except (OSError, ValueError):
        return False


def _process_start() -> float:
    """When this process started (time.time() scale; Linux's /proc, else now): a sibling worker's failure recorded
    after it is not retried."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def _run_points(ctx: SweepContext, todo: list[tuple[str, Point]], pdir: Path, progress: bool, log,
                ) -> list[dict[str, Any]]:
    """Measure each point that no other worker holds; write its record atomically as soon as it is done (failures
    included). Points another worker held are waited for at the end, and run here if it died without finishing."""
    records = []
    held: list[tuple[str, Point]] = []
    since = _process_start()
    total = len(todo)

    def kept() -> str:
        done = sum(point_finished(pdir / f"{pid}.json") for pid, _ in todo)
        return f"{done} of {total} sweep points to run are finished in {pdir.parent}"

    with progress_bar(progress, len(todo), "sweep") as tick, resumable(kept):
        for pid, p in todo:
            with _claim(pdir, pid, wait=False, since=since) as ours:
                if ours:
                    records.append(run_point(ctx, pid, p, pdir, log, tick))
                elif not point_finished(pdir / f"{pid}.json"):
                    held.append((pid, p))
            tick()
        for pid, p in held:  # another worker had it: wait for it, and take it over only if that worker died
            with _claim(pdir, pid, wait=True, since=since) as ours:  # before writing its record
                if ours:
                    records.append(run_point(ctx, pid, p, pdir, log, tick))
    return records


def mean_weight_bits(model: nn.Module) -> float | None:
    """The parameter-weighted mean weight width over the layers that steps reporting ``w_bits`` recorded in their
    state (``layers``), a later step overriding an earlier one on the same layer, and 32 for the rest of the blocks'
    Linear layers; None unless at least two such steps ran (one step's own ``w_bits`` is already exact)."""
    widths: dict[str, float] = {}
    steps = 0
    for t in model_info(model).transforms:
        w = config_from_dict({"name": t["name"], **t.get("config", {})}).report_fields().get("w_bits")
        layers = (t.get("state") or {}).get("layers")
        if w and layers:
            steps += 1
            widths.update(dict.fromkeys(layers, float(w)))
    if steps < 2:
        return None
    sizes = {n: m.in_features * m.out_features for n, m in model.named_modules()
             if n in widths or (isinstance(m, nn.Linear) and n.startswith("blocks.")
                                and not any(n.startswith(q + ".") for q in widths))}
    total = sum(sizes.values()) or 1
    return round(sum(sizes[n] * widths.get(n, 32.0) for n in sizes) / total, 2)


def run_point(ctx: SweepContext, pid: str, p: Point, pdir: Path, log, tick) -> dict[str, Any]:
    tick(0, description=f"sweep: {p.name}")
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"id": pid, "name": p.name, "family": p.family, "deployable": p.deployable,
                           "recovery": p.recovery, "dense": p.dense, "report": p.report, "stack": p.stack,
                           **{k: v for k, v in p.key().items() if k != "stack"}, "rank": ctx.rank, "pid": os.getpid()}
    try:
        rec.update(ctx.measure(p))
        rec["status"] = "ok"
    except (UserError, RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        rec.update({"status": "failed", "error": f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__})
        log(f"sweep: point '{p.name}' failed: {rec['error']}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec.update(run_context(ctx.bench.resolve_device()))
    atomic_write_json(pdir / f"{pid}.json", rec)
    log(f"sweep: ran '{p.name}' ({rec['status']}, {rec['seconds']} s)")
    return rec


def run_sweep(recipe: str | Path | dict[str, Any] | SweepConfig, out: str | Path, *, progress: bool = False,
              log=print, report: bool = True, shard: tuple[int, int] = (0, 1),
              variables: dict[str, str] | None = None, overrides: dict[str, Any] | None = None,
              only: list[str] | None = None, command: str | None = None) -> list[dict[str, Any]]:
    """Run every unfinished point (those with ``index % shard[1] == shard[0]``); write the report.

    variables: values for the recipe's ``${NAME}`` placeholders; overrides: dotted recipe fields to replace
    (:func:`load_sweep`); only: run just the points whose names start with one of these (the base always runs);
    command: the command line that reproduces the sweep, for the report. Returns the records of the points run now.
    """

    cfg = recipe if isinstance(recipe, SweepConfig) else load_sweep(recipe, variables, overrides)
    out = Path(out)
    points = expand(cfg)
    anchors = 1 + len(cfg.dense)  # the base and the dense baselines always run: every ratio is read against them
    chosen = [k < anchors or not only or any(p.name.startswith(o) for o in only) for k, p in enumerate(points)]
    unknown = [o for o in only or [] if not any(p.name.startswith(o) for p in points)]
    if unknown:
        raise ConfigError(f"--only: no point of the recipe is named {', '.join(map(repr, unknown))}")
    if shard[0] != 0:
        distributed.barrier()  # rank 0 trains or loads the base first, so the cache is filled once
    base, base_key = resolve_base(cfg, progress=progress, log=log)
    if shard[0] == 0 and shard[1] > 1:
        distributed.barrier()
    ids = [point_id(p, cfg, base_key) for p in points]
    pdir = out / "points"
    if shard[0] == 0:
        atomic_write_json(out / "sweep.json", {"config": cfg.to_dict(), "base_key": base_key, "command": command,
                                               "points": [{"id": i, "name": p.name, "family": p.family}
                                                          for i, p in zip(ids, points)]})
    todo = [(i, p) for k, (i, p) in enumerate(zip(ids, points))  # the report keeps every finished point
            if chosen[k] and k % shard[1] == shard[0] and not point_finished(pdir / f"{i}.json")]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} finished, on other ranks"
        f"{' or not chosen by --only' if only else ''}, {len(todo)} to run")
    records: list[dict[str, Any]] = []
    if todo:
        with distributed.local():  # each rank evaluates its own points alone
            ctx = SweepContext(base, cfg, progress=progress, logits_cache=out / "base_logits", base_key=base_key)
            records = _run_points(ctx, todo, pdir, progress, log)
    distributed.barrier()  # under torchrun: every rank's points are on disk before the report
    if report and shard[0] == 0:

        write_report(out)
    return records

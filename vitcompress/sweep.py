"""``vitcompress sweep RECIPE --out DIR``: apply compression stacks to one base model, measure each point.

A sweep recipe (YAML) is a :class:`SweepConfig`: the base model, eval and calibration data, how to time,
and the points, each an ordered stack of transform configs (``{name: token_merge, r: 4}``, ...; the step
``{name: recovery, epochs: 3}`` fine-tunes with distillation from the base at that position), plus grids
(``product: {"0.r": [2, 4, 8]}`` varies field ``r`` of stack entry 0). The uncompressed base is always a
point.

Each finished point is written atomically to ``DIR/points/<id>.json``; the id hashes the stack and every
setting that changes its numbers, so a re-run skips finished points and a crash or Ctrl-C loses none. A
point that fails is recorded with its error and the sweep goes on. The report (:mod:`.report`) is
written at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed
from .artifact import WEIGHTS, read_manifest
from .bench import BenchConfig, compare, model_runner, peak_memory_mb
from .config import Config
from .data import load_data
from .errors import ConfigError, UserError
from .evaluate import accuracy_metrics, predict, predict_traced, static_metrics
from .io import atomic_write_json, atomic_write_text, file_lock
from .models import data_config
from .pipeline import Calibration, apply_stack, create_model
from .provenance import run_context
from .recipes import recipe_path
from .report import write_report
from .robustness import AttackConfig, AttackSource, attack_eval
from .train import baseline, load_recipe
from .transforms import RecoveryConfig, config_from_dict
from .ui import progress_bar

FAMILIES = {"token_merge": "token", "adaptive_tokens": "token", "resolution": "token", "quantize": "quant",
            "prune": "prune", "block_sparse": "block-sparse", "sparse_attention": "attention"}


@dataclasses.dataclass
class SweepConfig(Config):
    """base: ``{recipe: NAME}`` (trained or reused from the cache), ``{artifact: DIR}`` or
    ``{model: TIMM_ID, kwargs: {...}, pretrained: bool, checkpoint: FILE}``.

    accuracy: ``DATA:top1`` or ``DATA:agreement``, the metric the Pareto fronts use.
    speed_model: ``{model: TIMM_ID, kwargs: {...}}`` to time each stack on that architecture (random
    weights; weights do not change speed) instead of on the base; accuracy still comes from the base.
    attack: attack settings (an :class:`~vitcompress.robustness.AttackConfig` dict, or a list of them) measured
    on ``attack_limit`` images of the first eval data: robust top-1 and transfer rate columns.
    """

    NAME = "sweep"
    VERSION = 1
    base: dict[str, Any] = dataclasses.field(default_factory=lambda: {"recipe": "digits_vit"})
    eval_data: list[str] = dataclasses.field(default_factory=lambda: ["digits", "digits-c"])
    eval_limit: int | None = None
    accuracy: str = "digits:top1"
    calib_data: str = "digits"
    calib_size: int = 32
    bench: dict[str, Any] = dataclasses.field(default_factory=lambda: {"batch_sizes": [1, 64], "repeat": 10})
    reference_batch: int | None = None
    speed_model: dict[str, Any] | None = None
    points: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    grid: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attack: list[dict[str, Any]] | dict[str, Any] | None = None
    attack_limit: int = 1000

    def validate(self) -> None:
        if not self.eval_data:
            raise ConfigError("a sweep needs eval_data")
        spec, _, metric = self.accuracy.partition(":")
        if spec not in self.eval_data or metric not in ("top1", "agreement"):
            raise ConfigError(f"accuracy must be DATA:top1 or DATA:agreement with DATA in eval_data, "
                              f"got '{self.accuracy}'")
        if not any(k in self.base for k in ("recipe", "artifact", "model")):
            raise ConfigError("base needs one of recipe, artifact or model")
        self.bench_config()  # validates
        self.attacks()  # validates
        if self.reference_batch is not None and self.reference_batch not in self.bench_config().batch_sizes:
            raise ConfigError(f"reference_batch {self.reference_batch} is not one of the bench batch sizes")

    def bench_config(self) -> BenchConfig:
        return BenchConfig.from_dict(self.bench)

    def attacks(self) -> list[AttackConfig]:
        given = [] if self.attack is None else [self.attack] if isinstance(self.attack, dict) else self.attack
        return [AttackConfig.from_dict(a) for a in given]

    @property
    def ref_batch(self) -> int:
        return self.reference_batch or max(self.bench_config().batch_sizes)


@dataclasses.dataclass
class Point:
    """One stack to measure. stack: transform config dicts (and ``recovery`` steps), in order."""

    name: str
    stack: list[dict[str, Any]]

    @property
    def family(self) -> str:
        fams = {FAMILIES.get(s["name"], s["name"]) for s in self.stack if s["name"] != "recovery"}
        return "base" if not fams else fams.pop() if len(fams) == 1 else "stacked"

    @property
    def deployable(self) -> bool:
        """False when a step only simulates (fake quantization runs in floating point)."""
        return not any((s["name"] == "quantize" and s.get("mode", "simulate") == "simulate")
                       or s["name"] == "mixed_precision" for s in self.stack)  # mixed precision simulates

    @property
    def recovery(self) -> str:

        levels = [RecoveryConfig.from_dict(s).level for s in self.stack if s["name"] == "recovery"]
        return "full" if "full" in levels else "short" if "short" in levels else "none"


def load_sweep(path_or_dict: str | Path | dict[str, Any]) -> SweepConfig:
    """A SweepConfig from a YAML path, a bundled recipe name, or a dict (the ``sweep:`` section if present)."""

    data = path_or_dict if isinstance(path_or_dict, dict) else load_recipe(recipe_path(str(path_or_dict)))
    return SweepConfig.from_dict(data.get("sweep", data))


def expand(cfg: SweepConfig) -> list[Point]:
    """The base, then every listed point, then every grid point; each stack validated; names unique."""

    points = [Point("base (uncompressed)", [])]
    for i, p in enumerate(cfg.points):
        if "stack" not in p:
            raise ConfigError(f"point {i} ({p.get('name', '?')}) has no stack")
        points.append(Point(str(p.get("name") or f"point {i}"), [dict(s) for s in p["stack"]]))
    for g in cfg.grid:
        fields = list((g.get("product") or {}).items())
        if not fields:
            raise ConfigError("a grid entry needs product: {'STEP.FIELD': [values, ...]}")
        for values in itertools.product(*(v for _, v in fields)):
            stack = [dict(s) for s in g["stack"]]
            label = {}
            for (key, _), value in zip(fields, values):
                step, _, field = key.partition(".")
                if not step.isdigit() or int(step) >= len(stack) or not field:
                    raise ConfigError(f"grid key '{key}' must be STEP.FIELD with STEP an index into the stack")
                stack[int(step)][field] = value
                label[field] = value
            name = str(g.get("name", "grid")).format(**label) if "{" in str(g.get("name", "")) else \
                f"{g.get('name', 'grid')} " + " ".join(f"{k}={v}" for k, v in label.items())
            points.append(Point(name, stack))
    for p in points:
        for step in p.stack:
            if "name" not in step:
                raise ConfigError(f"a step of point '{p.name}' has no name")
            config_from_dict(step)
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"duplicate point names: {', '.join(dup)}")
    return points


def point_id(point: Point, cfg: SweepConfig, base_key: str) -> str:
    """Hash of the stack and the settings that change a point's numbers (not its name)."""
    key = {"stack": point.stack, "base": base_key, "eval": [cfg.eval_data, cfg.eval_limit],
           "calib": [cfg.calib_data, cfg.calib_size], "bench": cfg.bench_config().to_dict(),
           "speed_model": cfg.speed_model}
    if cfg.attack:  # only then, so that the ids of sweeps without attacks stay as they were
        key["attack"] = [[a.to_dict() for a in cfg.attacks()], cfg.attack_limit]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_base(cfg: SweepConfig, *, progress: bool = False, log=print) -> tuple[nn.Module, str]:
    """The base model and a key identifying it (for point ids)."""
    b = cfg.base
    if "recipe" in b or "artifact" in b:
        path = baseline(b["recipe"], progress=progress, log=log) if "recipe" in b else Path(b["artifact"])
        return create_model(str(path)), f"artifact:{read_manifest(path)['files'][WEIGHTS]['sha256']}"
    model = create_model(b["model"], pretrained=bool(b.get("pretrained")), checkpoint=b.get("checkpoint"),
                         **(b.get("kwargs") or {}))
    return model, json.dumps(b, sort_keys=True)


def build_point(model: nn.Module, stack: list[dict[str, Any]], cfg: SweepConfig, *, train: bool = True) -> nn.Module:
    """A copy of ``model`` with ``stack`` applied (recovery distils from ``model``; skipped unless ``train``)."""
    return apply_stack(copy.deepcopy(model), stack, calib=Calibration(cfg.calib_data, cfg.calib_size),
                       teacher=model if train else None, train=train)


# ---------------------------------------------------------------------------------------------- running
class _Context:
    """What every point is measured against: the base's data, logits and speed runners (built once)."""

    def __init__(self, base: nn.Module, cfg: SweepConfig):

        self.cfg, self.base, self.bench, self.rank = cfg, base, cfg.bench_config(), distributed.world()[0]
        dcfg = data_config(base)
        self.data = {s: load_data(s, dcfg, limit=cfg.eval_limit) for s in cfg.eval_data}
        self.base_logits = {s: predict(base, d, cfg=self.bench)[0] for s, d in self.data.items()}
        sm = cfg.speed_model
        self.speed_base = base if sm is None else create_model(sm["model"], **(sm.get("kwargs") or {}))
        size = data_config(self.speed_base)["input_size"]
        self.base_runs = {bs: model_runner(self.speed_base, bs, size, self.bench) for bs in self.bench.batch_sizes}
        first = next(iter(self.data.values()))
        self.attack_data = load_data(cfg.eval_data[0], dcfg, limit=cfg.attack_limit) if cfg.attacks() else None
        self.images = next(iter(first.loader(max(self.bench.batch_sizes))))[0] \
            if cfg.speed_model is None and len(first) else None  # timing input for content-dependent models

    def measure(self, point: Point) -> dict[str, Any]:

        cfg, bench = self.cfg, self.bench
        model = build_point(self.base, point.stack, cfg)
        out: dict[str, Any] = {"accuracy": {}}
        tokens = {}
        for spec, data in self.data.items():
            d = data if data_config(model) == data_config(self.base) else data.for_config(data_config(model))
            logits, labels, _, tokens[spec] = predict_traced(model, d, cfg=bench)
            out["accuracy"][spec] = accuracy_metrics(logits, labels, self.base_logits[spec])
        if self.attack_data is not None:
            out["robustness"] = self.robustness(model)
        fast = model if cfg.speed_model is None else build_point(self.speed_base, point.stack, cfg, train=False)
        out.update(static_metrics(fast))
        first = next(iter(tokens.values()))
        if first is not None:  # adaptive token counts: the GFLOPs are the mean per image of the first eval data
            out.update(tokens=tokens, gflops=first["gflops_mean"], gmacs=first["gflops_mean"] / 2)
        size = data_config(fast)["input_size"]
        images = self.images if data_config(fast) == data_config(self.base) else None
        out["latency_ms"], out["base_latency_ms"], out["speedup"] = {}, {}, {}
        for bs, base_run in self.base_runs.items():
            r = compare(base_run, model_runner(fast, bs, size, bench, images), device=bench.resolve_device(),
                        warmup=bench.warmup, warmup_s=bench.warmup_s, repeat=bench.repeat)
            out["latency_ms"][str(bs)] = {"median": r["b_median_ms"], "p95": r["b_p95_ms"]}
            out["base_latency_ms"][str(bs)] = r["a_median_ms"]
            out["speedup"][str(bs)] = r["speedup"]
        ref = cfg.ref_batch
        out["throughput"] = ref / (out["latency_ms"][str(ref)]["median"] / 1e3)
        out["peak_mem_mb"] = peak_memory_mb(fast, ref, size, bench)
        out["transforms"] = [{k: v for k, v in t.items() if k != "state"} for t in model.vitcompress_info.transforms]
        out["recovery_record"] = model.vitcompress_info.provenance.get("recovery")
        out["training_record"] = model.vitcompress_info.provenance.get("learned_merge")
        return out


    def robustness(self, model: nn.Module) -> dict[str, Any]:
        """Each attack of the recipe on the point: ``{label: attack_eval result}``."""
        out: dict[str, Any] = {}
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


def _finished(path: Path) -> bool:
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
        yield held and not _finished(pdir / f"{pid}.json") and not _failed_by_sibling(pdir / f"{pid}.json", since)


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


def _run_points(ctx: _Context, todo: list[tuple[str, Point]], pdir: Path, progress: bool, log,
                ) -> list[dict[str, Any]]:
    """Measure each point that no other worker holds; write its record atomically as soon as it is done (failures
    included). Points another worker held are waited for at the end, and run here if it died without finishing."""
    records = []
    held: list[tuple[str, Point]] = []
    since = _process_start()
    with progress_bar(progress, len(todo), "sweep") as tick:
        for pid, p in todo:
            with _claim(pdir, pid, wait=False, since=since) as ours:
                if ours:
                    records.append(_run_point(ctx, pid, p, pdir, log, tick))
                elif not _finished(pdir / f"{pid}.json"):
                    held.append((pid, p))
            tick()
        for pid, p in held:  # another worker had it: wait for it, and take it over only if that worker died
            with _claim(pdir, pid, wait=True, since=since) as ours:  # before writing its record
                if ours:
                    records.append(_run_point(ctx, pid, p, pdir, log, tick))
    return records


def _run_point(ctx: _Context, pid: str, p: Point, pdir: Path, log, tick) -> dict[str, Any]:
    tick(0, description=f"sweep: {p.name}")
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"id": pid, "name": p.name, "family": p.family, "deployable": p.deployable,
                           "recovery": p.recovery, "stack": p.stack, "rank": ctx.rank, "pid": os.getpid()}
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
              log=print, report: bool = True, shard: tuple[int, int] = (0, 1)) -> list[dict[str, Any]]:
    """Run every unfinished point (those with ``index % shard[1] == shard[0]``); write the report.

    Returns the records of the points run now.
    """

    cfg = recipe if isinstance(recipe, SweepConfig) else load_sweep(recipe)
    out = Path(out)
    points = expand(cfg)
    if shard[0] != 0:
        distributed.barrier()  # rank 0 trains or loads the base first, so the cache is filled once
    base, base_key = resolve_base(cfg, progress=progress, log=log)
    if shard[0] == 0 and shard[1] > 1:
        distributed.barrier()
    ids = [point_id(p, cfg, base_key) for p in points]
    pdir = out / "points"
    if shard[0] == 0:
        atomic_write_json(out / "sweep.json", {"config": cfg.to_dict(), "base_key": base_key, "points": [
            {"id": i, "name": p.name, "family": p.family} for i, p in zip(ids, points)]})
    todo = [(i, p) for k, (i, p) in enumerate(zip(ids, points))
            if k % shard[1] == shard[0] and not _finished(pdir / f"{i}.json")]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} finished or on other ranks, {len(todo)} to run")
    records: list[dict[str, Any]] = []
    if todo:
        with distributed.local():  # each rank evaluates its own points alone
            records = _run_points(_Context(base, cfg), todo, pdir, progress, log)
    distributed.barrier()  # under torchrun: every rank's points are on disk before the report
    if report and shard[0] == 0:

        write_report(out)
    return records

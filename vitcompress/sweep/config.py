"""The sweep recipe: :class:`SweepConfig`, its points (:class:`Point`), and the ids that make a sweep resumable.

A sweep recipe (YAML) holds the base model, eval and calibration data, how to time, and the points, each an ordered
stack of transform configs (``{name: token_merge, r: 4}``, ...; ``{name: recovery, epochs: 3}`` fine-tunes with
distillation from the base at that position), plus grids (``product: {"0.r": [2, 4, 8]}`` varies field ``r`` of
stack entry 0). A point also says where it runs (``runtime``: torch, torch-compile, onnxruntime or openvino on its
export; ``dtype`` for torch; ``export``: ExportConfig fields) or that it is a peer tool's model (``peer``:
ort_quantize_static or nncf on the dense export). ``dense:`` adds the uncompressed model in other runtimes as
baselines: the report's speed-ups are against the fastest of them.

``variables:`` gives defaults for ``${NAME}`` placeholders in the recipe's strings; ``vitcompress sweep --data``
sets ``${data}`` and ``--var NAME=VALUE`` any other, so that a shipped recipe names no local path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

from ..bench import BenchConfig, Dtype
from ..config import Config, StrEnum, parse_enum
from ..data.registry import HELDOUT_DISJOINT_FROM
from ..errors import ConfigError
from ..export import Runtime
from ..export.peers import Peer
from ..goals import check_goals
from ..recipes import recipe_path
from ..robustness import AttackConfig
from ..train import load_recipe
from ..transforms import RecoveryConfig, config_from_dict


@dataclasses.dataclass
class SweepConfig(Config):
    """base: ``{recipe: NAME}`` (trained or reused from the cache), ``{artifact: DIR}`` or
    ``{model: TIMM_ID, kwargs: {...}, pretrained: bool, checkpoint: FILE}``.

    eval_data: data specs to score every point on (empty: a speed-only sweep); accuracy: ``DATA:top1`` or
    ``DATA:agreement``, the metric the Pareto fronts use (a held-out train split, ``heldout:N:SOURCE``, is how a
    choice is made; the test split is for reporting).
    speed: False for an accuracy-only sweep. speed_model: ``{model: TIMM_ID, kwargs: {...}}`` to time each stack on
    that architecture (random weights; weights do not change speed) instead of on the base.
    runtime: where points run unless they say otherwise. dense: the dense baselines to add, each ``RUNTIME`` or
    ``torch:DTYPE`` (e.g. ``[torch:fp32, torch:bf16, torch-compile, onnxruntime, openvino]``).
    attack: attack settings (an :class:`~vitcompress.robustness.AttackConfig` dict, or a list of them) measured
    on ``attack_limit`` images of the first eval data: robust top-1 and transfer rate columns.
    title: the report's heading. goals: targets the report judges on the finished points
    (:mod:`vitcompress.goals`); they change no point. peer_max_drop: the budget (points) of the
    ``nncf_accuracy_control`` peer, which validates on the first eval data.
    """

    NAME = "sweep"
    VERSION = 1
    title: str | None = None
    base: dict[str, Any] = dataclasses.field(default_factory=lambda: {"recipe": "digits_vit"})
    eval_data: list[str] = dataclasses.field(default_factory=lambda: ["digits", "digits-c"])
    eval_limit: int | None = None
    accuracy: str = "digits:top1"
    calib_data: str = "digits"
    calib_size: int = 32
    bench: dict[str, Any] = dataclasses.field(default_factory=lambda: {"batch_sizes": [1, 64], "repeat": 10})
    speed: bool = True
    reference_batch: int | None = None
    speed_model: dict[str, Any] | None = None
    runtime: Runtime = Runtime.TORCH
    dense: list[str] = dataclasses.field(default_factory=list)
    points: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    grid: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attack: list[dict[str, Any]] | dict[str, Any] | None = None
    attack_limit: int = 1000
    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    goals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    peer_max_drop: float = 1.0  # the accuracy-control peer's budget: points of the accuracy metric

    def validate(self) -> None:
        check_goals(self.goals)
        spec, _, metric = self.accuracy.rpartition(":")
        if self.eval_data and (spec not in self.eval_data or metric not in ("top1", "agreement")):
            raise ConfigError(f"accuracy must be DATA:top1 or DATA:agreement with DATA in eval_data, "
                              f"got '{self.accuracy}'")
        if self.runtime == Runtime.CUDA:
            raise ConfigError("runtime cuda is a search target; a sweep runs torch-compile with bench device cuda")
        if not self.eval_data and not self.speed:
            raise ConfigError("a sweep with no eval_data and speed: false measures nothing")
        if not any(k in self.base for k in ("recipe", "artifact", "model")):
            raise ConfigError("base needs one of recipe, artifact or model")
        self.bench_config()  # validates
        self.attacks()  # validates
        for d in self.dense:
            dense_point(d)
        if any(s.startswith("heldout:") for s in self.eval_data):
            self._check_heldout()
        if self.reference_batch is not None and self.reference_batch not in self.bench_config().batch_sizes:
            raise ConfigError(f"reference_batch {self.reference_batch} is not one of the bench batch sizes")

    def _check_heldout(self) -> None:
        """Held-out images are outside the calibration and training subsets of the sizes in HELDOUT_DISJOINT_FROM:
        refuse a step that calibrates or trains on another number of images (it could have seen them)."""
        sizes = [("calib_size", self.calib_size)]
        for p in [*self.points, *self.grid]:
            for step in p.get("stack") or []:
                if step.get("name") == RecoveryConfig.NAME:
                    sizes.append((f"{p.get('name')}: recovery limit", step.get("limit")))
                elif "calib_size" in step:
                    sizes.append((f"{p.get('name')}: calib_size", step["calib_size"]))
        bad = [f"{what} {n}" for what, n in sizes if n not in HELDOUT_DISJOINT_FROM]
        if bad:
            raise ConfigError(f"held-out eval data needs calibration and training sizes in {HELDOUT_DISJOINT_FROM} "
                              f"(so that no step sees a held-out image): {', '.join(bad)}")

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
    """One thing to measure. stack: transform config dicts (and ``recovery`` steps), in order; runtime / dtype /
    export / peer: where and how it runs (None: the sweep's defaults)."""

    name: str
    stack: list[dict[str, Any]]
    runtime: Runtime | None = None
    dtype: Dtype | None = None
    export: dict[str, Any] | None = None
    peer: Peer | None = None

    def runs_in(self, cfg: SweepConfig) -> Runtime:
        """Where the point runs: its own runtime, else the sweep's."""
        return self.runtime or cfg.runtime

    @property
    def configs(self) -> list[Config]:
        return [config_from_dict(s) for s in self.stack]

    @property
    def family(self) -> str:
        if self.peer is not None:
            return "peer"
        fams = {c.FAMILY for c in self.configs if c.NAME != RecoveryConfig.NAME}
        return ("base" if self.runtime is None else "dense") if not fams else fams.pop() if len(fams) == 1 \
            else "stacked"

    @property
    def deployable(self) -> bool:
        """False when a step only simulates (fake quantization runs in floating point)."""
        return all(c.deployable for c in self.configs)

    @property
    def report(self) -> dict[str, Any]:
        """What the stack's families show in reports (later steps win)."""
        return {k: v for c in self.configs for k, v in c.report_fields().items()}

    @property
    def dense(self) -> bool:
        """The uncompressed model (in some runtime): a speed baseline."""
        return not self.stack and self.peer is None

    @property
    def recovery(self) -> str:
        levels = [c.level for c in self.configs if c.NAME == RecoveryConfig.NAME]
        return "full" if "full" in levels else "short" if "short" in levels else "none"

    def key(self) -> dict[str, Any]:
        """What changes this point's numbers besides the sweep's settings (defaults left out, so that the ids of
        sweeps written before points had runtimes stay as they were)."""
        extra = {k: str(v) if isinstance(v, StrEnum) else v for k, v in (
            ("runtime", self.runtime), ("dtype", self.dtype), ("export", self.export), ("peer", self.peer))
            if v is not None}
        return {"stack": self.stack, **extra}


def dense_point(spec: str) -> Point:
    """``torch:bf16``, ``torch-compile``, ``onnxruntime``, ... -> the dense model as a point in that runtime."""
    runtime, _, dtype = spec.partition(":")
    return make_point(f"dense ({spec})", {"stack": [], "runtime": runtime, "dtype": dtype or None})


def load_sweep(path_or_dict: str | Path | dict[str, Any], variables: dict[str, str] | None = None,
               overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A SweepConfig from a YAML path, a bundled recipe name, or a dict (the ``sweep:`` section if present);
    ``${NAME}`` placeholders are filled from ``variables``, then from the recipe's own ``variables:``.

    overrides: ``{"bench.batch_sizes": [1], "base": {...}}``: a dotted key replaces that field of the recipe
    (``vitcompress sweep --set KEY=VALUE``), before validation."""
    data = path_or_dict if isinstance(path_or_dict, dict) else load_recipe(recipe_path(str(path_or_dict)))
    data = override(dict(data.get("sweep", data)), overrides or {})
    values = {**(data.get("variables") or {}), **(variables or {})}
    data["variables"] = {k: str(v) for k, v in values.items()}
    return SweepConfig.from_dict(fill_placeholders(data, data["variables"]))


def override(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted ``key`` of ``overrides`` set; every part of the key but the last must
    name a mapping of the recipe (a typo is a one-line error, not a silently new field)."""
    data = json.loads(json.dumps(data))
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = data
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: the recipe has no mapping '{'.'.join(parents[: i + 1])}'")
            node = node[part]
        if not last:
            raise ConfigError(f"--set takes KEY=VALUE with a dotted KEY, got '{key}'")
        node[last] = value
    return data


def fill_placeholders(value: Any, variables: dict[str, str]) -> Any:
    """``value`` (a recipe, or any part of one) with its ``${NAME}`` placeholders filled from ``variables``; an unknown
    one is a one-line error."""
    if isinstance(value, dict):
        return {k: v if k == "variables" else fill_placeholders(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in variables:
            flag = "--data PATH" if m.group(1) == "data" else f"--var {m.group(1)}=VALUE"
            raise ConfigError(f"the recipe uses ${{{m.group(1)}}}: give it with {flag}")
        return variables[m.group(1)]

    return re.sub(r"\$\{(\w+)\}", one, value)


def expand(cfg: SweepConfig) -> list[Point]:
    """The base, the dense baselines, then every listed point, then every grid point; each validated; names
    unique."""
    points = [Point("base (uncompressed)", []), *(dense_point(d) for d in cfg.dense)]
    for i, p in enumerate(cfg.points):
        if "stack" not in p and "peer" not in p:
            raise ConfigError(f"point {i} ({p.get('name', '?')}) has no stack")
        points.append(make_point(str(p.get("name") or f"point {i}"), p))
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
            points.append(make_point(name, {**g, "stack": stack}))
    for p in points:
        for step in p.stack:
            if "name" not in step:
                raise ConfigError(f"a step of point '{p.name}' has no name")
        _ = p.configs  # validates every step
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"duplicate point names: {', '.join(dup)}")
    return points


def make_point(name: str, p: dict[str, Any]) -> Point:
    unknown = sorted(set(p) - {"name", "stack", "runtime", "dtype", "export", "peer", "product"})
    if unknown:
        raise ConfigError(f"point '{name}': unknown field(s) {', '.join(unknown)}")
    pt = Point(name, [dict(s) for s in p.get("stack") or []],
               runtime=None if p.get("runtime") is None else parse_enum(Runtime, p["runtime"], "runtime"),
               dtype=None if p.get("dtype") is None else parse_enum(Dtype, p["dtype"], "dtype"),
               export=p.get("export"), peer=None if p.get("peer") is None else parse_enum(Peer, p["peer"], "peer"))
    if pt.runtime == Runtime.CUDA:
        raise ConfigError(f"point '{name}': runtime cuda is a search target; a sweep runs torch-compile with "
                          "bench device cuda")
    if pt.peer is not None and (pt.stack or pt.runtime is None or not pt.runtime.exported):
        raise ConfigError(f"point '{name}': a peer quantizes the dense export itself: give it no stack and runtime "
                          "onnxruntime or openvino")
    if pt.export is not None and not (pt.runtime and pt.runtime.exported):
        raise ConfigError(f"point '{name}': export settings need runtime onnxruntime or openvino")
    if pt.dtype is not None and pt.runtime is not None and pt.runtime.exported:
        raise ConfigError(f"point '{name}': an exported model runs in float32; a dtype is for torch runtimes")
    return pt


def point_id(point: Point, cfg: SweepConfig, base_key: str) -> str:
    """Hash of the point and the settings that change its numbers (not its name)."""
    key = {**point.key(), "base": base_key, "eval": [cfg.eval_data, cfg.eval_limit],
           "calib": [cfg.calib_data, cfg.calib_size], "bench": cfg.bench_config().to_dict(),
           "speed_model": cfg.speed_model}
    if cfg.attack:  # only then, so that the ids of sweeps without attacks stay as they were
        key["attack"] = [[a.to_dict() for a in cfg.attacks()], cfg.attack_limit]
    if not cfg.speed:
        key["speed"] = False
    if point.runtime is None and point.runs_in(cfg) != Runtime.TORCH:
        key["runtime"] = str(cfg.runtime)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

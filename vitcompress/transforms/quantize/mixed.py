"""Mixed-precision PTQ: a bit width per layer under a size budget, from a sensitivity measured on calibration images.

1. Sensitivity, ``sensitivity``: ``kl`` quantizes each selected layer alone to WbAb (on a copy, with the base
   settings) and measures KL(float || quantized) of the logits on the calibration images; ``hessian`` is HAWQ-v2's
   (Dong et al., 2020): the mean Hessian trace of the loss over the layer's weights, estimated by Hutchinson's method,
   times the squared weight quantization error ||Q_b(W) - W||^2 (weights only, no forward per width).
2. Allocation, ``solver``: ``exact`` (the default) minimises the summed sensitivity under the budget by dynamic
   programming over the bits spent (a multiple-choice knapsack, exact since every layer's cost is a whole multiple
   of the parameter counts' greatest common divisor); ``greedy`` starts every layer at the widest candidate and,
   while the parameter-weighted mean weight width is over ``mean_bits``, takes the one-step narrowing with the least
   sensitivity added per bit saved. Layers named in ``keep`` stay at the widest candidate.
3. Apply: one :class:`~.config.QuantConfig` per width, over the layers given that width (narrowest last), each
   calibrated on the model as the earlier groups left it. The allocation is recorded; a restore replays it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...config import Config, StrEnum
from ...errors import ConfigError
from ...ui import tracked
from ..layers import calib_batches
from ..registry import TransformContext, register_transform
from . import ops
from .config import QuantConfig
from .transform import quantize_, rebuild_quantized, select_layers


class Sensitivity(StrEnum):
    KL = "kl"  # each layer alone at WbAb: KL of the logits (measured, weights and activations)
    HESSIAN = "hessian"  # HAWQ-v2: mean Hessian trace x squared weight error (weights only)


class Solver(StrEnum):
    EXACT = "exact"  # dynamic programming over the bits spent: the least summed sensitivity within the budget
    GREEDY = "greedy"  # marginal cost per bit saved (the earlier default)


@dataclasses.dataclass
class MixedPrecisionConfig(Config):
    """mean_bits: the budget, the parameter-weighted mean weight width (activations take their layer's width);
    candidates: the widths to choose from; quant: the other QuantConfig settings (observer, reparam, rounding,
    layers, ...; simulate mode); keep: layers held at the widest candidate (e.g. the first and the last)."""

    NAME = "mixed_precision"

    FAMILY = "quant"
    VERSION = 2  # v2 added solver (v1 dicts: greedy, as they ran)
    mean_bits: float = 5.0
    candidates: list[int] = dataclasses.field(default_factory=lambda: [4, 6, 8])
    quant: dict[str, Any] = dataclasses.field(default_factory=dict)
    keep: list[str] = dataclasses.field(default_factory=list)
    calib_size: int = 64
    solver: Solver = Solver.EXACT
    sensitivity: Sensitivity = Sensitivity.KL
    hutchinson_samples: int = 16
    needs_calibration = True

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        return {"solver": Solver.GREEDY, **data} if version < 2 else data

    def report_fields(self) -> dict[str, Any]:
        return {"w_bits": float(self.mean_bits)}  # the budget: the allocation stays at or under it

    @property
    def deployable(self) -> bool:
        return False  # mixed precision simulates its bit widths (fake quantization)

    def validate(self) -> None:
        if not self.candidates or any(int(b) != b or not 2 <= b <= 8 for b in self.candidates):
            raise ConfigError(f"candidates must be widths from 2 to 8, got {self.candidates}")
        self.candidates = sorted({int(b) for b in self.candidates})
        if not self.candidates[0] <= self.mean_bits <= self.candidates[-1]:
            raise ConfigError(f"mean_bits {self.mean_bits} is outside the candidates' range {self.candidates}")
        if {"w_bits", "a_bits", "mode"} & set(self.quant):
            raise ConfigError("quant sets everything but the widths and the mode (mixed precision simulates)")
        if self.hutchinson_samples < 1:
            raise ConfigError(f"hutchinson_samples must be >= 1, got {self.hutchinson_samples}")
        self.base(self.candidates[0])  # the QuantConfig must be valid

    def base(self, bits: int, layers: list[str] | None = None, model: nn.Module | None = None) -> QuantConfig:
        """The QuantConfig for ``layers`` at ``bits``; a subset without attention modules (given ``model``) takes no
        softmax quantizer, which only an attention module has."""
        extra: dict[str, Any] = {"layers": layers} if layers is not None else {}
        if layers is not None and model is not None and not any(
                isinstance(model.get_submodule(n), Attention) for n in layers):
            extra["softmax"] = "none"
        return QuantConfig.from_dict({**self.quant, "w_bits": bits, "a_bits": bits, "calib_size": self.calib_size,
                                      **extra})


@torch.inference_mode()
def _logits(model: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float() for x in images])


def sensitivities(model: nn.Module, cfg: MixedPrecisionConfig, calib: list[Any]) -> dict[str, dict[int, float]]:
    """KL(float || layer alone at WbAb) of the logits, per layer and candidate width."""
    device = next(model.parameters()).device
    images = [x for x, _ in calib_batches(calib, cfg.calib_size, device)]
    ref = F.log_softmax(_logits(model, images), -1)
    out: dict[str, dict[int, float]] = {}
    chosen = select_layers(model, cfg.base(cfg.candidates[0]))
    for name, _ in tracked(chosen, len(chosen), "mixed precision: sensitivity (layers)"):
        out[name] = {}
        for bits in cfg.candidates:
            trial = copy.deepcopy(model)
            quantize_(trial, cfg.base(bits, [name], model), TransformContext(calib=calib))
            logp = F.log_softmax(_logits(trial, images), -1)
            out[name][bits] = float((ref.exp() * (ref - logp)).sum(-1).mean())
    return out


def hessian_traces(model: nn.Module, names: list[str], images: list[torch.Tensor], samples: int = 16,
                   seed: int = 0) -> dict[str, float]:
    """Mean Hessian trace Tr(H_W) / n of the loss over each named layer's weight W (n elements), by Hutchinson's
    estimator E[v^T H v] over Rademacher v (HAWQ-v2). The loss is the cross-entropy to the model's own float
    predictions (no labels needed), summed over ``images`` (a list of [B,3,H,W] batches)."""
    model = copy.deepcopy(model).float().eval()
    weights = [model.get_submodule(n).weight for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(names)
    with sdpa_kernel(SDPBackend.MATH):  # Hessian-vector products need double backward, which fused SDPA lacks
        for x in images:
            _accumulate(model, weights, x, samples, gen, traces)
    return {n: t / w.numel() for n, t, w in zip(names, traces, weights)}


def _accumulate(model: nn.Module, weights: list[torch.Tensor], x: torch.Tensor, samples: int,
                gen: torch.Generator, traces: list[float]) -> None:
    """Add one batch's Hutchinson estimate of each weight's Hessian trace to ``traces``."""
    with torch.no_grad():
        target = model(x).argmax(-1)
    loss = F.cross_entropy(model(x), target, reduction="sum")
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    for _ in range(samples):
        vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
        hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
        for i, (v, hv) in enumerate(zip(vs, hvs)):
            traces[i] += float((v * hv).sum()) / samples


NO_NARROWING = 1e30  # a sensitivity no budget trade accepts


def hessian_sensitivities(model: nn.Module, cfg: MixedPrecisionConfig, calib: list[Any],
                          ) -> dict[str, dict[int, float]]:
    """HAWQ-v2's sensitivity per layer and width: Tr(H_W) / n x ||Q_b(W) - W||^2."""
    device = next(model.parameters()).device
    images = [x for x, _ in calib_batches(calib, cfg.calib_size, device)]
    base = cfg.base(cfg.candidates[0])
    layers = select_layers(model, base)
    names = [n for n, m in layers if isinstance(getattr(m, "weight", None), torch.Tensor)]
    traces = hessian_traces(model, names, images, cfg.hutchinson_samples)
    group = base.group
    # a weightless quantizer (an attention matmul's inputs) has no weight error to weigh and costs no size: it takes
    # the widest candidate, as the KL allocation gives it (narrowing it saves nothing), instead of being left out
    widest = max(cfg.candidates)
    out = {n: {b: 0.0 if b == widest else NO_NARROWING for b in cfg.candidates} for n, _ in layers if n not in names}
    for n in names:
        weight = model.get_submodule(n).weight
        w = weight.detach().float().reshape(weight.shape[0], -1)
        out[n] = {b: traces[n] * float((ops.fake_quant_weight(w, b, group) - w).pow(2).sum()) for b in cfg.candidates}
    return out


def allocate(sens: dict[str, dict[int, float]], params: dict[str, int], candidates: list[int], mean_bits: float,
             keep: Iterable[str] = ()) -> dict[str, int]:
    """Greedy widths per layer with the parameter-weighted mean <= ``mean_bits`` (see the module docstring)."""
    bits = {n: candidates[-1] for n in sens}
    total = sum(params.values())
    fixed = set(keep)

    def mean() -> float:
        return sum(bits[n] * params[n] for n in bits) / total

    while mean() > mean_bits + 1e-9:
        best, best_cost = None, float("inf")
        for n in bits:
            i = candidates.index(bits[n])
            if n in fixed or i == 0:
                continue
            if not params[n]:  # narrowing a layer without weights saves no size
                continue
            lower = candidates[i - 1]
            cost = (sens[n][lower] - sens[n][bits[n]]) / ((bits[n] - lower) * params[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            raise ConfigError(f"mean_bits {mean_bits} is out of reach: the layers held wide leave {mean():.2f}")
        bits[best] = candidates[candidates.index(bits[best]) - 1]
    return bits


def allocate_exact(sens: dict[str, dict[int, float]], params: dict[str, int], candidates: list[int],
                   mean_bits: float, keep: Iterable[str] = ()) -> dict[str, int]:
    """The widths with the least summed sensitivity whose parameter-weighted mean is <= ``mean_bits``: a dynamic
    program over the budget in units of ``gcd(params)`` bits (every layer's cost is a whole number of units)."""
    names = list(sens)
    unit = math.gcd(*(params[n] for n in names)) or 1
    budget = math.floor(mean_bits * sum(params.values()) / unit + 1e-9)
    options = {n: [candidates[-1]] if n in set(keep) else candidates for n in names}
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # units spent -> (sensitivity, widths so far)
    for n in names:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for spent, (cost, widths) in best.items():
            for b in options[n]:
                total = spent + b * params[n] // unit
                if total > budget:
                    continue
                cand = (cost + sens[n][b], [*widths, b])
                if total not in nxt or cand[0] < nxt[total][0]:
                    nxt[total] = cand
        best = nxt
        if not best:
            raise ConfigError(f"mean_bits {mean_bits} is out of reach: the layers held wide leave no room")
    _, widths = min(best.values(), key=lambda t: t[0])
    return dict(zip(names, widths))


def _weights(model: nn.Module, name: str) -> int:
    w = getattr(model.get_submodule(name), "weight", None)
    return w.numel() if isinstance(w, torch.Tensor) else 0


def _groups(alloc: dict[str, int]) -> dict[int, list[str]]:
    """Layers by width, widest first (each width is one quantize step)."""
    groups: dict[int, list[str]] = {}
    for n, b in sorted(alloc.items(), key=lambda kv: -kv[1]):
        groups.setdefault(b, []).append(n)
    return groups


def _rebuild(model: nn.Module, cfg: MixedPrecisionConfig, state: dict[str, Any]) -> None:
    """The recorded allocation, one quantize step per width."""
    groups = _groups({n: int(b) for n, b in state["bits"].items()})
    for b, names in groups.items():
        rebuild_quantized(model, cfg.base(b, names, model), state.get("groups", {}).get(str(b)) or {})


@register_transform(MixedPrecisionConfig, rebuild=_rebuild)
def mixed_precision_(model: nn.Module, cfg: MixedPrecisionConfig, ctx: TransformContext) -> dict[str, Any]:
    """Measure sensitivities, allocate the widths and apply them in place."""
    if ctx.calib is None:
        raise ConfigError("mixed precision measures sensitivities on calibration images (--calib-data)")
    known = [n for n, _ in select_layers(model, cfg.base(cfg.candidates[0]))]
    unknown = sorted(set(cfg.keep) - set(known))
    if unknown:  # a misspelt name would silently hold nothing wide
        raise ConfigError(f"keep names layers that are not quantized here: {', '.join(unknown)} "
                          f"(e.g. {', '.join(known[:3])}{', ...' if len(known) > 3 else ''})")
    calib = list(ctx.calib)
    sens = (hessian_sensitivities if cfg.sensitivity == Sensitivity.HESSIAN else sensitivities)(model, cfg, calib)
    params = {n: _weights(model, n) for n in sens}  # an attention matmul has no weights: it costs no size
    solve = allocate_exact if cfg.solver == Solver.EXACT else allocate
    alloc = solve(sens, params, cfg.candidates, cfg.mean_bits, cfg.keep)
    states = {str(b): quantize_(model, cfg.base(b, names, model), TransformContext(calib=calib))
              for b, names in _groups(alloc).items()}
    weights = {n: _weights(model, n) for n in alloc}
    mean = sum(alloc[n] * weights[n] for n in alloc) / max(sum(weights.values()), 1)
    return {"bits": alloc, "mean_bits": round(mean, 4), "sensitivity": sens, "groups": states}


__all__ = ["MixedPrecisionConfig", "Sensitivity", "Solver", "allocate", "allocate_exact", "hessian_sensitivities",
           "hessian_traces", "mixed_precision_", "sensitivities"]

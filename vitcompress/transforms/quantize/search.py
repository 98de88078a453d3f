"""The searched scales of every quantized Linear / Conv2d: PTQ4ViT's (Yuan et al., 2022; ``observer: ptq4vit``) and
AdaLog's (Wu et al., 2024; ``observer: adalog``).

AdaLog searches the weights as PTQ4ViT does, and each input grid by its fast progressive combining search (FPCS,
:func:`fpcs`): (scale, zero point) pairs from the 0.1 / 0.9 quantiles out to the extremes, the best 16 refined on a
finer scale grid, 4 steps in all, on the layer output's squared error.


Per layer, the weight grid's scale and the input's grid are each searched over the reference's 100 candidates,
alpha in linspace(0.01, 1.2, 100) times the calibrated maximum (eq_alpha, eq_beta, eq_n), in 3 alternating rounds
(search_round): the weights with the inputs fixed, then the inputs with the weights fixed. Each candidate is
scored on the layer's output Y = X W^T over the calibration rows: by the squared error (``search_metric: mse``)
or by PTQ4ViT's Hessian-guided metric sum(grad^2 (Y_q - Y)^2), grad the task loss's gradient at Y
(``search_metric: hessian``; a diagonal Fisher approximation of the Hessian).

Kept as ours: the weight grid stays per output channel (the reference's default is one scale per tensor), so
alpha scales every channel's maximum; the input grid is our asymmetric one, so alpha scales both ends of the
calibrated range; a post-GELU layer's twin / adalog input grid keeps its own search (only its weights are searched
here). The search reads the first 32 calibration images, the reference's calibration size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..layers import run_calibration
from . import ops
from .calib import _rows, output_grads
from .simulate import QuantAttention

if TYPE_CHECKING:
    from .calib import Ranges
    from .config import QuantConfig

ALPHAS = tuple(float(a) for a in torch.linspace(0.01, 1.2, 100))
ROUNDS = 3
SEARCH_IMAGES = 32


def _best(errors: torch.Tensor) -> int:
    """The candidate with the least error (a NaN error never wins)."""
    return int(torch.nan_to_num(errors, nan=float("inf")).argmin())


def _ignore(key: str, t: torch.Tensor) -> None:
    """An attention observer that records nothing (its presence keeps the attention in floating point)."""


def _out_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """A layer's output (or its gradient) as rows [M, O]: a Conv2d's [B,O,H,W] with the channels last."""
    if isinstance(module, nn.Conv2d):
        g = g.flatten(2).transpose(1, 2)
    return g.detach().float().reshape(-1, g.shape[-1])


def layer_errors(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, x_fq: Any, w_bits: int,
                 group: int | None, a_alpha: float, w_alphas: tuple[float, ...]) -> torch.Tensor:
    """Each weight candidate's output error [C] for inputs x [M,I], weight w [O,I], gradient grad [M,O] or None.
    x_fq(x, alpha) fake-quantizes the inputs on the grid scaled by alpha."""
    y = x @ w.t()
    xq = x_fq(x, a_alpha)
    out = []
    for a in w_alphas:
        d = xq @ ops.fake_quant_weight(w, w_bits, group, a).t() - y
        out.append(((d * grad) ** 2).sum() if grad is not None else (d ** 2).sum())
    return torch.stack(out)


def input_errors(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, x_fq: Any, w_bits: int,
                 group: int | None, w_alpha: float, a_alphas: tuple[float, ...]) -> torch.Tensor:
    """Each input-grid candidate's output error [C], the weights fixed on their grid at ``w_alpha``."""
    y = x @ w.t()
    wq = ops.fake_quant_weight(w, w_bits, group, w_alpha).t()
    out = []
    for a in a_alphas:
        d = x_fq(x, a) @ wq - y
        out.append(((d * grad) ** 2).sum() if grad is not None else (d ** 2).sum())
    return torch.stack(out)


def search_scales(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: QuantConfig, calib: Iterable[Any],
                  ranges: Ranges, gelus: set[str]) -> dict[str, dict[str, float]]:
    """Search every Linear / Conv2d's weight clip and input range in place of the calibrated ones: ``ranges`` is
    updated (the input range ''), and the weight clips are returned with the chosen alphas per layer:
    {name: {"w_alpha", "a_alpha"}} (AdaLog's FPCS sets the range itself: its a_alpha is 1)."""
    targets = {n: m for n, m in layers if isinstance(m, (nn.Linear, nn.Conv2d))}
    n_img = min(cfg.calib_size, SEARCH_IMAGES)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in targets}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[name].append(_rows(module, args[0]))
        return fn

    attns = [m for m in model.modules() if isinstance(m, QuantAttention) and m._vc_observer is None]
    for a in attns:  # observed = floating point: the search reads the float model's inputs and gradients
        a._vc_observer = _ignore
    try:
        run_calibration(model, calib, n_img, [(m, hook(n)) for n, m in targets.items()])
        grads = output_grads(model, targets, calib, n_img) if str(cfg.search_metric) == "hessian" else {}
    finally:
        for a in attns:
            a._vc_observer = None
    a_bits, w_bits = cfg.a_bits, int(cfg.w_bits) if cfg.w_bits is not None else None
    fpcs_inputs = str(cfg.observer) == "adalog"
    chosen: dict[str, dict[str, float]] = {}
    for name, m in targets.items():
        x = torch.cat(inputs.pop(name))
        w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
        g = torch.cat([_out_rows(m, t) for t in grads.pop(name)]) if grads else None
        rng = ranges.get(name, {})
        x_fq = _input_quantizer(rng, a_bits, str(cfg.post_gelu) if name in gelus else None)
        w_alpha, a_alpha, pair = 1.0, 1.0, None
        searched_input = a_bits is not None and "" in rng and name not in gelus
        for _ in range(ROUNDS):
            if w_bits is not None:
                w_alpha = ALPHAS[_best(layer_errors(x, w, g, x_fq, w_bits, cfg.group, a_alpha, ALPHAS))]
            if searched_input and fpcs_inputs:  # AdaLog: (scale, zero point) pairs refined progressively
                wq = ops.fake_quant_weight(w, w_bits, cfg.group, w_alpha).t() if w_bits is not None else w.t()
                pair = fpcs(x, int(a_bits), functools.partial(_output_error, x=x, wq_t=wq, y=x @ w.t(), grad=g))
                x_fq = functools.partial(_pair_quantizer, scale=pair[0], zp=pair[1], bits=int(a_bits))
            elif searched_input:
                a_alpha = ALPHAS[_best(input_errors(x, w, g, x_fq, w_bits or 0, cfg.group, w_alpha, ALPHAS))]
            if w_bits is None:
                break
        if searched_input:
            lo, hi = rng[""]
            if pair is not None:  # the pair as a range: act_grid gives back exactly this scale and zero point
                sc, z = pair
                lo, hi, a_alpha = -z * sc, (2 ** int(a_bits) - 1 - z) * sc, 1.0
            ranges.setdefault(name, {})[""] = (lo * a_alpha, hi * a_alpha)
        chosen[name] = {"w_alpha": w_alpha, "a_alpha": a_alpha}
    return chosen


def _input_quantizer(rng: dict[str, tuple[float, float]], bits: int | None, post_gelu: str | None) -> Any:
    """x [M,I], alpha -> x on the layer's input grid with its range scaled by alpha (the identity without one);
    post_gelu: that layer's twin / adalog grid with its own searched parameter (alpha unused)."""
    if bits is None or "" not in rng:
        return lambda x, a: x
    lo, hi = rng[""]
    if post_gelu is not None:
        param = rng.get("gelu_param", (1.0 if post_gelu == "twin" else 2.0,))[0]
        return lambda x, a: ops.post_gelu_quant(x, bits, post_gelu, lo, hi, param)

    def fq(x: torch.Tensor, a: float) -> torch.Tensor:
        s, z = ops.act_qparams(torch.tensor(lo * a), torch.tensor(hi * a), bits)
        return ops.fake_quant_act(x, s, z, bits)
    return fq


# ------------------------------------------------------------------------------------------------------- AdaLog
FPCS_WIDTH, FPCS_STEPS, EQ_N = 16, 4, 100


def percentile_candidates(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLog's initial (scale, zero point) pairs of an asymmetric per-tensor grid for x: ranges from the
    0.1 / 0.9 quantiles out to the extremes (EQ_N / zero points of them), times min(16, 2^(b-1)) zero points
    around the middle code. Returns scales [K], zero points [K]."""
    flat = x.detach().float().flatten()
    if flat.numel() > 2**20:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 2**20]]
    q = torch.quantile(flat, torch.tensor([0.0, 0.1, 0.9, 1.0]))
    half = 2 ** (bits - 1)
    n_zp = min(16, half)
    n_scale = EQ_N // n_zp
    deltas = torch.linspace(float(q[2] - q[1]), float(q[3] - q[0]), n_scale) / (2**bits - 1)
    zps = torch.arange(half - n_zp // 2, half + n_zp // 2).float()
    return deltas.repeat(n_zp), zps.repeat_interleave(n_scale)


def _fq_pair(x: torch.Tensor, scale: float, zp: float, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def _pair_quantizer(x: torch.Tensor, alpha: float, *, scale: float, zp: float, bits: int) -> torch.Tensor:
    """An input quantizer (x, alpha) -> fake-quantized x on a searched (scale, zero point); alpha unused."""
    return _fq_pair(x, scale, zp, bits)


def _output_error(fq: Any, *, x: torch.Tensor, wq_t: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None,
                  ) -> torch.Tensor:
    """The layer output's error sum((fq(x) Wq^T - y)^2), weighted by grad^2 when given."""
    d = fq(x) @ wq_t - y
    return ((d * grad) ** 2).sum() if grad is not None else (d ** 2).sum()


def fpcs(x: torch.Tensor, bits: int, score: Any) -> tuple[float, float]:
    """AdaLog's fast progressive combining search of an input grid: score(fq) -> error of the layer output with
    the inputs fake-quantized by fq; keep the best FPCS_WIDTH pairs, refine each one's scale on a finer grid
    around it (the zero point kept), FPCS_STEPS times in all. Returns the best (scale, zero point)."""
    scales, zps = percentile_candidates(x, bits)
    step = float(scales[1] - scales[0]) if len(scales) > 1 else float(scales[0]) / 10
    new = EQ_N // FPCS_WIDTH
    for k in range(FPCS_STEPS):
        errs = torch.stack([score(lambda t, s=float(s), z=float(z): _fq_pair(t, max(s, 1e-8), z, bits))
                            for s, z in zip(scales, zps)])
        keep = errs.argsort()[: 1 if k == FPCS_STEPS - 1 else FPCS_WIDTH]
        scales, zps = scales[keep], zps[keep]
        if k == FPCS_STEPS - 1:
            break
        offsets = (torch.linspace(0, 1, new) - 0.5) * step
        step = step / (new - 0.5)
        scales = (scales[:, None] + offsets[None]).flatten().clamp_min(1e-8)
        zps = zps.repeat_interleave(new)
    return float(scales[0]), float(zps[0])

"""Calibration for post-training quantization: activation ranges, GPTQ Hessians, RepQ-ViT reparameterization.

Everything here runs the model on up to ``calib_size`` calibration images (train split) with the earlier
transforms of the stack active, and reads tensors through hooks; nothing is quantized yet.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import calib_batches, run_calibration, select_layers
from . import ops
from .simulate import QUANTIZABLE, QuantAttention, post_gelu_layers

if TYPE_CHECKING:
    from .config import QuantConfig

Ranges = dict[str, dict[str, tuple[float, float]]]  # layer -> tensor key ('' or q/k/v/p) -> (lo, hi)


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as GEMM rows [M, I]: Linear inputs as they are, Conv2d inputs unfolded into patches."""
    if isinstance(module, nn.Conv2d):
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    return x.detach().float().reshape(-1, x.shape[-1])


def output_grads(model: nn.Module, taps: dict[str, nn.Module], calib: Iterable[Any], calib_size: int,
                 ) -> dict[str, list[torch.Tensor]]:
    """Per calibration batch, the task loss's gradient at each tapped output, in batch order: a QuantAttention's
    O = softmax(q k^T) v as [B,H,N,Dh] (read at its proj's input), a Linear's output as it is. The loss is the
    cross-entropy against the model's own top-1: the KL to the float model's own predictions has zero gradient at
    the float model, so PTQ4ViT's Fisher approximation of the Hessian needs labels, and the model's predictions
    stand in for them. Runs in floating point."""
    device = next(model.parameters()).device
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in taps}
    captured: dict[str, torch.Tensor] = {}

    def attn_in(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0]
        return fn

    def linear_out(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            captured[name] = out
        return fn

    attns = {n: m for n, m in taps.items() if isinstance(m, QuantAttention)}
    handles = [m.proj.register_forward_pre_hook(attn_in(n)) for n, m in attns.items()]
    handles += [m.register_forward_hook(linear_out(n)) for n, m in taps.items() if n not in attns]
    for a in attns.values():
        a._vc_observer = lambda key, t: None  # observed = floating point
    try:
        for x, _ in calib_batches(calib, calib_size, device):
            with torch.enable_grad():
                logits = model(x.requires_grad_(True)).float()
                loss = F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
                found = torch.autograd.grad(loss, [captured[n] for n in taps])
            for (n, m), g in zip(taps.items(), found):
                g = g.detach()
                grads[n].append(g.reshape(*g.shape[:2], m.num_heads, -1).transpose(1, 2) if n in attns else g)
    finally:
        for h in handles:
            h.remove()
        for a in attns.values():
            a._vc_observer = None
    return grads


def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: QuantConfig,
              calib: Iterable[Any]) -> tuple[Ranges, dict[str, torch.Tensor]]:
    """Per-layer input ranges and, for one-pass GPTQ, input Hessians sum(x^T x) [I,I] of Linear/Conv2d layers
    (sequential GPTQ takes each Hessian later, with :func:`layer_hessian`, so none is collected here).

    Attention layers must already be :class:`QuantAttention`: their q, k, v and softmax output are read
    through ``_vc_observer``. minmax keeps the extremes over all batches; percentile and mse average their
    per-batch choices; the softmax keeps its maximum.
    """
    seen: dict[str, dict[str, list[tuple[float, float]]]] = {n: {} for n, _ in layers}
    observer = "minmax" if str(cfg.observer) in ("ptq4vit", "adalog") else str(cfg.observer)  # searched from there
    hessians: dict[str, torch.Tensor] = {}
    gptq = str(cfg.rounding) == "gptq" and not cfg.gptq_sequential

    search = str(cfg.softmax) if str(cfg.softmax) in ops.SOFTMAX_SEARCH else None
    errors: dict[str, torch.Tensor] = {}
    gelu_errors: dict[str, torch.Tensor] = {}
    gelu_range: dict[str, tuple[float, float]] = {}
    gelus = post_gelu_layers(model, layers, str(cfg.post_gelu)) if cfg.static_acts else set()
    grads: dict[str, list[torch.Tensor]] = {}
    if str(cfg.search_metric) == "hessian" and cfg.static_acts:
        taps = {n: m for n, m in layers if (search and isinstance(m, QuantAttention)) or n in gelus}
        grads = output_grads(model, taps, calib, cfg.calib_size) if taps else {}
    values: dict[str, torch.Tensor] = {}  # each attention's v of the current batch (the hessian metric needs it)
    batch_of: dict[str, int] = {}

    def batch_grad(name: str) -> torch.Tensor | None:
        """This layer's gradient for the batch being observed (None without the hessian metric)."""
        if name not in grads:
            return None
        i = batch_of[name] = batch_of.get(name, -1) + 1
        return grads[name][i]

    def record(name: str, key: str, t: torch.Tensor) -> None:
        if key == "v" and grads:
            values[name] = t
        if key == "p":
            rng = (0.0, float(t.max()))
            if search:  # adalog / twin: each candidate's error on this batch, summed over batches
                g = batch_grad(name)
                extra = {} if g is None else {"v": values[name], "grad": g}
                err = ops.softmax_search_errors(t, max(rng[1], ops.EPS), int(cfg.a_bits), search, **extra)
                errors[name] = errors.get(name, 0) + err
        else:
            rng = ops.act_range(t, observer, int(cfg.a_bits), cfg.percentile)
        seen[name].setdefault(key, []).append(rng)

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if cfg.static_acts:
                record(name, "", args[0])
            if name in gelus:  # the post-GELU grid's parameter: each candidate's error at this layer's output
                err = ops.gelu_search_errors(args[0], module.weight, int(cfg.a_bits), batch_grad(name),
                                             str(cfg.post_gelu))
                gelu_errors[name] = gelu_errors.get(name, 0) + err
                lo, hi = gelu_range.get(name, (0.0, 0.0))
                gelu_range[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
            if gptq:
                x = _rows(module, args[0])
                hessians[name] = hessians.get(name, 0) + x.t() @ x
        return fn

    hooks = []
    for name, m in layers:
        if isinstance(m, QuantAttention):  # runs in float while observed
            m._vc_observer = (lambda key, t, name=name: record(name, key, t)) if cfg.static_acts else \
                (lambda key, t: None)
        else:
            hooks.append((m, hook(name)))
    try:
        run_calibration(model, calib, cfg.calib_size, hooks)
    finally:
        for _, m in layers:
            if isinstance(m, QuantAttention):
                m._vc_observer = None
    out: Ranges = {}
    for name, keys in seen.items():
        for key, ranges in keys.items():
            lows, highs = zip(*ranges)
            if observer == "minmax" or key == "p":
                out.setdefault(name, {})[key] = (min(lows), max(highs))
            else:
                out.setdefault(name, {})[key] = (sum(lows) / len(lows), sum(highs) / len(highs))
    for name, err in gelu_errors.items():  # twin: R2's top as a share of the maximum; adalog: its base
        best = _searched(name, ops.post_gelu_candidates(str(cfg.post_gelu)), err, str(cfg.post_gelu))
        out.setdefault(name, {})["gelu_param"] = (best, best)
        out[name][""] = gelu_range[name]  # the raw extremes: the grids are set from the maximum itself
    for name, err in errors.items():  # the searched softmax parameter travels as a degenerate range
        best = _searched(name, ops.SOFTMAX_SEARCH[search], err, str(search))  # type: ignore[index]
        out.setdefault(name, {})["p_param"] = (best, best)
    return out, hessians


def _searched(name: str, grid: tuple[float, ...], err: torch.Tensor, kind: str) -> float:
    """The grid value with the least error; a warning when it is the grid's edge (the optimum may lie beyond)."""
    i = int(err.argmin())
    if i in (0, len(grid) - 1):
        warnings.warn(f"{name}: the {kind} search chose the edge of its grid ({grid[i]:.4g} of "
                      f"{min(grid):.4g}..{max(grid):.4g}); the best value may lie outside it", stacklevel=3)
    return grid[i]


def layer_hessian(model: nn.Module, layer: nn.Module, calib: Iterable[Any], calib_size: int) -> torch.Tensor:
    """sum(x^T x) [I,I] of ``layer``'s inputs when the calibration images run through ``model`` as it is now."""
    total: dict[str, torch.Tensor] = {}

    def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = _rows(module, args[0])
        total["h"] = total.get("h", 0) + x.t() @ x

    run_calibration(model, calib, calib_size, [(layer, fn)])
    return total["h"]


def _norm_linear_pairs(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, str]]:
    """The (LayerNorm, Linear) pairs whose Linear is selected: norm1 -> qkv and norm2 -> fc1 (with an affine
    LayerNorm, into which a per-channel scale of the Linear's input folds)."""
    pairs = [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv") for i in range(len(model.blocks))]
    pairs += [(f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1") for i in range(len(model.blocks))]
    selected = {n for n, _ in select_layers(model, cfg.layers, cfg.exclude, types=QUANTIZABLE)}
    return [(n, lin) for n, lin in pairs if lin in selected
            and isinstance(model.get_submodule(n), nn.LayerNorm) and model.get_submodule(n).elementwise_affine]


def _input_ranges(model: nn.Module, names: list[str], calib: Iterable[Any], size: int,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-channel minimum and maximum [C] of each named Linear's input over the calibration images."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo[name] = torch.minimum(lo[name], x.amin(0)) if name in lo else x.amin(0)
            hi[name] = torch.maximum(hi[name], x.amax(0)) if name in hi else x.amax(0)
        return fn

    run_calibration(model, calib, size, [(model.get_submodule(n), hook(n)) for n in names])
    return lo, hi


def _fold_(norm: nn.LayerNorm, lin: nn.Linear, r1: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Make the LayerNorm output (X + shift) / r1 and the Linear take W r1 (and b - W shift): the float function
    is unchanged. r1, shift: [C]."""
    with torch.no_grad():
        if shift is not None:
            if lin.bias is not None:
                lin.bias.sub_((lin.weight.float() @ shift).to(lin.bias.dtype))
            norm.bias.add_(shift.to(norm.bias.dtype))
        lin.weight.mul_(r1.to(lin.weight.dtype)[None, :])
        norm.bias.copy_((norm.bias.float() / r1).to(norm.bias.dtype))
        norm.weight.copy_((norm.weight.float() / r1).to(norm.weight.dtype))


def repq_reparam_(model: nn.Module, cfg: QuantConfig, calib: Iterable[Any]) -> list[str]:
    """RepQ-ViT's scale reparameterization, in place, for each (LayerNorm -> Linear) pair: norm1 -> qkv and
    norm2 -> fc1, when those Linears are selected and activations are quantized per tensor.

    With per-channel asymmetric parameters (s, z) of the post-LayerNorm activation X and their means
    (s~, z~): r1 = s / s~, r2 = z - z~. The LayerNorm outputs X~ = (X + s r2) / r1 (gamma / r1,
    (beta + s r2) / r1) and the Linear takes W r1 and b - W (s r2), so the float function is unchanged while
    one per-tensor quantizer on X~ acts like per-channel quantization of X.
    """
    pairs = _norm_linear_pairs(model, cfg)
    lo, hi = _input_ranges(model, [lin for _, lin in pairs], calib, cfg.calib_size)
    for norm_name, lin_name in pairs:
        s, z = ops.act_qparams(lo[lin_name], hi[lin_name], int(cfg.a_bits))
        r1 = (s / s.mean()).clamp_min(1e-4)  # any r1 > 0 keeps the float function; avoid dead-channel blow-up
        r2 = z - torch.round(z.mean())
        _fold_(model.get_submodule(norm_name), model.get_submodule(lin_name), r1, s * r2)
    return [lin for _, lin in pairs]


def smoothquant_reparam_(model: nn.Module, cfg: QuantConfig, calib: Iterable[Any]) -> list[str]:
    """SmoothQuant's scale migration (Xiao et al. 2023), in place, for each (LayerNorm -> Linear) pair.

    Per input channel j of the Linear: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha). X / s comes out of the
    LayerNorm (gamma / s, beta / s) and the Linear takes W s, so the float function is unchanged while outlier
    channels of X (what LayerNorm gammas of up to 11 make in a pretrained DINOv2) move into the per-channel
    weight grid. Works for static and per-token activations, simulated and deployed, with no runtime cost.
    """
    pairs = _norm_linear_pairs(model, cfg)
    lo, hi = _input_ranges(model, [lin for _, lin in pairs], calib, cfg.calib_size)
    alpha = cfg.smooth_alpha
    for norm_name, lin_name in pairs:
        lin = model.get_submodule(lin_name)
        x_max = torch.maximum(lo[lin_name].abs(), hi[lin_name].abs()).clamp_min(1e-5)
        w_max = lin.weight.detach().float().abs().amax(0).clamp_min(1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1e-4, 1e4)
        _fold_(model.get_submodule(norm_name), lin, s)
    return [lin for _, lin in pairs]

"""BRECQ as published (Li et al. 2021; the reference code's block reconstruction), on the ViT's blocks.

Two stages, as the reference's ``main_imagenet.py`` runs them:

1. **Weights.** Activations stay in floating point everywhere. Each block in turn learns the rounding of its
   quantized Linear weights (AdaRound: W_q = s * clamp(floor(W / s) + h(V)), h the rectified sigmoid), on inputs from
   the quantized model ("asym") against the float block's output on float inputs. The loss is the reconstruction
   error **summed** over the token axis and averaged over the rest (the reference's ``lp_loss``; optionally weighted
   by the squared Fisher diagonal, ``|dKL / d out| + 1``), **plus** AdaRound's regulariser
   ``0.01 * sum(1 - |2 h - 1|^b)`` over every rounding variable (also summed), off for the first 20 % of the steps,
   then with b annealed linearly from 20 to 2. Adam at 1e-3. The weights then take the hard rounding h >= 0.5.
2. **Activation steps.** With the weights fixed and the activations quantized, each block learns the step sizes of
   its static activation grids (LSQ), Adam at 4e-4 with cosine annealing to 0, on the L_2.4 error (``p = 2.4``),
   for a quarter of the weight stage's steps (the reference: 5,000 against 20,000).

:func:`brecq_` records, per block, the error before and after and the share of rounding variables that ended binary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ui import tracked
from .reconstruct import AdaRoundWeight, _block_io, keep_step_, rectified_sigmoid, step_
from .simulate import FakeQuantLinear, _ActQuant

ROUND_WEIGHT = 0.01  # the reference's --weight
WARMUP = 0.2  # share of the steps without the rounding regulariser
B_RANGE = (20.0, 2.0)
W_LR, A_LR, A_P = 1e-3, 4e-4, 2.4


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0, fisher: torch.Tensor | None = None,
            ) -> torch.Tensor:
    """The reference's reconstruction error for outputs [B,N,C]: |pred - target|^p (times the squared Fisher
    diagonal when given) summed over dim 1, averaged over the rest."""
    err = (pred - target).abs().pow(p)
    if fisher is not None:
        err = err * fisher.pow(2)
    return err.sum(1).mean()


def temperature(it: int, iters: int) -> float:
    """b: 20 until the warm-up ends, then linearly down to 2 at the last step."""
    start = WARMUP * iters
    if it < start:
        return B_RANGE[0]
    return B_RANGE[1] + (B_RANGE[0] - B_RANGE[1]) * max(0.0, 1 - (it - start) / max(iters - start, 1))


def round_loss(roundings: Iterable[AdaRoundWeight], b: float) -> torch.Tensor:
    """AdaRound's regulariser, summed over every rounding variable, at ROUND_WEIGHT."""
    return ROUND_WEIGHT * sum((1 - (2 * rectified_sigmoid(r.v) - 1).abs().pow(b)).sum() for r in roundings)


def binary_share(roundings: Iterable[AdaRoundWeight]) -> float:
    """The share of rounding variables whose h(V) is exactly 0 or 1 (the rectified sigmoid's clamp)."""
    hs = torch.cat([rectified_sigmoid(r.v).detach().flatten() for r in roundings])
    return float(((hs == 0) | (hs == 1)).float().mean())


def _set_act(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, _ActQuant):
            m._vc_act_off = not on


def _tail(model: nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
    """``model``'s logits from the tokens x [B,N,C] entering block ``start``."""
    for blk in model.blocks[start:]:
        x = blk(x)
    return model.forward_head(model.norm(x))


def _fisher(qblock: nn.Module, float_model: nn.Module, i: int, xq: torch.Tensor, xf: torch.Tensor, batch: int,
            ) -> torch.Tensor:
    """|dKL(float || quantized up to block i) / d block_i's output| + 1, per element (the reference's
    ``save_grad_data``: the model quantized up to and including this block, float after it)."""
    grads = []
    for j in range(0, len(xq), batch):
        with torch.no_grad():
            p_float = _tail(float_model, float_model.blocks[i](xf[j:j + batch]), i + 1).softmax(-1)
        out = qblock(xq[j:j + batch]).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(_tail(float_model, out, i + 1), -1), p_float, reduction="batchmean")
            (g,) = torch.autograd.grad(loss, out)
        grads.append(g.abs() + 1.0)
    return torch.cat(grads)


def brecq_(model: nn.Module, float_model: nn.Module, clips: dict[str, float], bits: int, group: int | None,
           calib: Iterable[Any], calib_size: int, iters: int, fisher: bool = False, batch: int = 32,
           ) -> dict[str, Any]:
    """Reconstruct ``model`` (simulated-quantized in place) block by block against ``float_model``: stage 1 the
    weights' rounding, stage 2 the activation step sizes. Returns, per block, the output error (mean square) with
    RTN weights, after stage 1 (weights only) and after stage 2, and the share of binary rounding variables."""
    calib = list(calib)
    record: dict[str, Any] = {}
    _set_act(model, False)  # stage 1: weights only, activations in floating point everywhere
    try:
        for i, (qblock, fblock) in enumerate(tracked(zip(model.blocks, float_model.blocks), len(model.blocks),
                                                     "BRECQ stage 1 (blocks)")):
            xq = torch.cat(_block_io(model, qblock, calib, calib_size))
            xf = torch.cat(_block_io(float_model, fblock, calib, calib_size))
            with torch.no_grad():
                target = torch.cat([fblock(xf[j:j + batch]) for j in range(0, len(xf), batch)])
            grads = _fisher(qblock, float_model, i, xq, xf, batch) if fisher else None
            mods = {n: m for n, m in qblock.named_modules() if isinstance(m, FakeQuantLinear)}
            rounding = {n: AdaRoundWeight(fblock.get_submodule(n).weight.detach(), bits, group,
                                          clips.get(f"blocks.{i}.{n}", 1.0)) for n in mods}
            before = _mse(qblock, xq, target, batch)
            saved = {n: m.weight for n, m in mods.items()}
            opt = torch.optim.Adam([r.v for r in rounding.values()], lr=W_LR)
            g = torch.Generator().manual_seed(i)
            try:
                for m in mods.values():
                    del m.weight
                for it in range(iters):
                    idx = torch.randperm(len(xq), generator=g)[:batch]
                    for n, m in mods.items():
                        m.weight = rounding[n].weight()
                    loss = lp_loss(qblock(xq[idx]), target[idx], 2.0, None if grads is None else grads[idx])
                    if it >= WARMUP * iters:
                        loss = loss + round_loss(rounding.values(), temperature(it, iters))
                    step_(opt, loss)
            finally:
                for n, m in mods.items():
                    if "weight" in m.__dict__:
                        del m.weight
                    m.weight = saved[n]
                    with torch.no_grad():
                        m.weight.copy_(rounding[n].weight(hard=True).to(m.weight.dtype))
            record[f"blocks.{i}"] = {"mse_rtn_weights": before, "mse_weights": _mse(qblock, xq, target, batch),
                                     "binary": binary_share(rounding.values())}
    finally:
        _set_act(model, True)
    for i, (qblock, fblock) in enumerate(tracked(zip(model.blocks, float_model.blocks), len(model.blocks),
                                                 "BRECQ stage 2 (blocks)")):  # activation steps
        xq = torch.cat(_block_io(model, qblock, calib, calib_size))
        xf = torch.cat(_block_io(float_model, fblock, calib, calib_size))
        with torch.no_grad():
            target = torch.cat([fblock(xf[j:j + batch]) for j in range(0, len(xf), batch)])
        record[f"blocks.{i}"]["mse_before_steps"] = _mse(qblock, xq, target, batch)
        _learn_steps(qblock, xq, target, max(1, iters // 4), batch, seed=i)  # the reference: 5,000 vs 20,000
        record[f"blocks.{i}"]["mse"] = _mse(qblock, xq, target, batch)
    return record


def _learn_steps(qblock: nn.Module, xq: torch.Tensor, target: torch.Tensor, iters: int, batch: int, seed: int,
                 ) -> None:
    """Stage 2 on one block: the static activation step sizes of its quantized Linear inputs (LSQ)."""
    mods = {n: m for n, m in qblock.named_modules() if isinstance(m, FakeQuantLinear)
            and m._vc_a_bits is not None and not m._vc_per_token and m._vc_post_gelu == "uniform"}
    if not mods:
        return
    steps = {n: nn.Parameter(m.a_scale.detach().clone()) for n, m in mods.items()}
    opt = torch.optim.Adam(list(steps.values()), lr=A_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    g = torch.Generator().manual_seed(1000 + seed)
    try:
        for m in mods.values():
            m._vc_lsq = True
        for m in mods.values():
            del m.a_scale
        for _ in range(iters):
            idx = torch.randperm(len(xq), generator=g)[:batch]
            for n, m in mods.items():
                m.a_scale = steps[n]
            loss = lp_loss(qblock(xq[idx]), target[idx], A_P)
            step_(opt, loss)
            sched.step()
    finally:
        for n, m in mods.items():
            m._vc_lsq = False
            keep_step_(m, steps[n])


@torch.no_grad()
def _mse(block: nn.Module, x: torch.Tensor, target: torch.Tensor, batch: int) -> float:
    total = sum(F.mse_loss(block(x[j:j + batch]), target[j:j + batch], reduction="sum").item()
                for j in range(0, len(x), batch))
    return total / target.numel()

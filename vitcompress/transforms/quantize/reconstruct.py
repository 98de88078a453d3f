"""Block-wise reconstruction (BRECQ, Li et al. 2021, with AdaRound's rounding, Nagel et al. 2020).

After the simulate conversion (weights on their RTN grid, activation grids calibrated), each transformer block
in turn learns, on the calibration images:

- the rounding of its quantized Linear weights: W_q = s * clamp(floor(W / s) + h(V), -qmax, qmax) with
  AdaRound's rectified sigmoid h(V) in [0, 1], started at the RTN remainder and driven to 0 or 1 by the
  regulariser lambda * sum(1 - |2 h(V) - 1|^beta), beta annealed from 20 to 2 after a warm-up;
- the step sizes of its static activation grids (LSQ: the rounding passes the gradient straight through),

minimising || block_q(x_q) - block_float(x_float) ||^2, where x_q is the block's input in the quantized model (the
earlier blocks already reconstructed) and x_float the float model's. The weights then take the hard rounding
h(V) >= 0.5. Pure tensor pieces live here; the loop runs one block at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ui import tracked
from ..layers import run_calibration
from . import ops
from .simulate import FakeQuantLinear

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) == rest (the RTN remainder in [0, 1))."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def round_reg(v: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's regulariser: 0 when every h(V) is 0 or 1."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


class AdaRoundWeight:
    """The learnable rounding of one weight w [O,I] on its symmetric grid (per channel or per group)."""

    def __init__(self, w: torch.Tensor, bits: int, group: int | None, clip: float):
        self.shape, self.q = w.shape, ops.qmax_signed(bits)
        self.scale = ops.weight_scale(w, bits, group, clip)  # [O,1] or [O,I/g,1]
        scaled = w.float().reshape(*self.scale.shape[:-1], -1) / self.scale
        self.floor = scaled.floor()
        self.v = nn.Parameter(init_v(scaled - self.floor))

    def weight(self, hard: bool = False) -> torch.Tensor:
        h = (self.v >= 0).float() if hard else rectified_sigmoid(self.v)  # rectified_sigmoid(v) >= 0.5 iff v >= 0
        return ((self.floor + h).clamp(-self.q, self.q) * self.scale).reshape(self.shape)


def step_(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``."""
    opt.zero_grad()
    loss.backward()
    opt.step()


def keep_step_(m: nn.Module, step: torch.Tensor) -> None:
    """Make a learned activation step size (a Parameter standing in for ``a_scale``) the layer's buffer again."""
    if "a_scale" in m._parameters or "a_scale" in m.__dict__:
        delattr(m, "a_scale")
    m.register_buffer("a_scale", step.detach().clamp_min(ops.EPS))


def _block_io(model: nn.Module, block: nn.Module, calib: Iterable[Any], size: int) -> list[torch.Tensor]:
    """The inputs [b,N,C] ``block`` receives when the calibration images run through ``model`` as it is."""
    seen: list[torch.Tensor] = []

    def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach().float())

    run_calibration(model, calib, size, [(block, fn)])
    return seen


def reconstruct_blocks_(model: nn.Module, float_model: nn.Module, clips: dict[str, float], bits: int,
                        group: int | None, calib: Iterable[Any], calib_size: int, iters: int, batch: int = 32,
                        lr: float = 1e-3, act_lr: float = 4e-5, weight: float = 0.01) -> dict[str, Any]:
    """Reconstruct every block of ``model`` (simulated-quantized in place) against ``float_model``'s blocks.
    Returns the per-block output error before and after (mean squared error on the calibration inputs)."""
    calib = list(calib)
    record: dict[str, Any] = {}
    for i, (qblock, fblock) in enumerate(tracked(zip(model.blocks, float_model.blocks), len(model.blocks),
                                                 "reconstruct (blocks)")):
        xq = torch.cat(_block_io(model, qblock, calib, calib_size))
        xf = torch.cat(_block_io(float_model, fblock, calib, calib_size))
        with torch.no_grad():
            target = torch.cat([fblock(xf[j:j + batch]) for j in range(0, len(xf), batch)])
        mods = {n: m for n, m in qblock.named_modules() if isinstance(m, FakeQuantLinear)}
        rounding = {n: AdaRoundWeight(fblock.get_submodule(n).weight.detach(), bits, group,
                                      clips.get(f"blocks.{i}.{n}", 1.0)) for n in mods}
        steps = {n: nn.Parameter(m.a_scale.detach().clone()) for n, m in mods.items()
                 if m._vc_a_bits is not None and not m._vc_per_token}
        saved = {n: m.weight for n, m in mods.items()}
        before = _mse(qblock, xq, target, batch)
        try:
            for n, m in mods.items():  # the weight and step size become functions of the learned parameters
                del m.weight
                m._vc_lsq = n in steps
            opt = torch.optim.Adam([{"params": [r.v for r in rounding.values()], "lr": lr},
                                    {"params": list(steps.values()), "lr": act_lr}])
            g = torch.Generator().manual_seed(i)
            for it in range(iters):
                idx = torch.randint(0, len(xq), (min(batch, len(xq)),), generator=g)
                for n, m in mods.items():
                    m.weight = rounding[n].weight()
                    if n in steps:
                        m.a_scale = steps[n]
                loss = F.mse_loss(qblock(xq[idx]), target[idx])
                warm = 0.2 * iters
                if it >= warm:  # AdaRound: beta from 20 down to 2 over the rest
                    beta = 2 + 18 * (1 - (it - warm) / max(iters - warm, 1))
                    loss = loss + weight * sum(round_reg(r.v, beta) for r in rounding.values()) / \
                        sum(r.v.numel() for r in rounding.values())
                step_(opt, loss)
        finally:
            for n, m in mods.items():
                m._vc_lsq = False
                if "weight" in m.__dict__:
                    del m.weight
                m.weight = saved[n]
                with torch.no_grad():
                    m.weight.copy_(rounding[n].weight(hard=True).to(m.weight.dtype))
                    if n in steps:
                        keep_step_(m, steps[n])
        record[f"blocks.{i}"] = {"mse_rtn": before, "mse": _mse(qblock, xq, target, batch)}
    return record


@torch.no_grad()
def _mse(block: nn.Module, x: torch.Tensor, target: torch.Tensor, batch: int) -> float:
    total = sum(F.mse_loss(block(x[j:j + batch]), target[j:j + batch], reduction="sum").item()
                for j in range(0, len(x), batch))
    return total / target.numel()

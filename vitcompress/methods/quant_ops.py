"""Quantization as pure tensor functions: scales, integer codes, fake quantization, observers.

Weights are symmetric signed (codes in [-qmax, qmax], qmax = 2^(b-1) - 1), per output channel [O,1] or per
group of ``g`` input channels [O, I/g, 1]. Activations are asymmetric unsigned (codes in [0, 2^b - 1] with
a zero point), per tensor (a calibrated static scale) or per token (computed on the fly). Everything is
computed in float32; outputs keep the input dtype.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def qmax_signed(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scale(w: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0) -> torch.Tensor:
    """Symmetric scales for w [O,I]: [O,1] per channel, or [O, I/g, 1] per group of ``group_size``."""
    w = w.float()
    if group_size:
        w = w.reshape(w.shape[0], -1, group_size)
    return (w.abs().amax(dim=-1, keepdim=True) * clip).clamp_min(EPS) / qmax_signed(bits)


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 storage) of w [O,I] for ``weight_scale``'s scale: round-to-nearest, clamped."""
    q = qmax_signed(bits)
    shaped = w.float().reshape(*scale.shape[:-1], -1)
    return torch.round(shaped / scale).clamp(-q, q).to(torch.int8).reshape(w.shape)


def weight_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights [O,I] from int8 codes and their scales."""
    return (codes.float().reshape(*scale.shape[:-1], -1) * scale).reshape(codes.shape)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0) -> torch.Tensor:
    scale = weight_scale(w, bits, group_size, clip)
    return weight_dequant(weight_codes(w, scale, bits), scale).to(w.dtype)


def mse_weight_clip(w: torch.Tensor, bits: int, group_size: int | None = None,
                    grid: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(21))) -> float:
    """The clip ratio (of the absmax) minimising the weight's squared quantization error."""
    errs = [((fake_quant_weight(w, bits, group_size, c).float() - w.float()) ** 2).sum().item() for c in grid]
    return grid[min(range(len(grid)), key=errs.__getitem__)]


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero point) covering [lo, hi] (range always includes 0)."""
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(EPS)
    return scale, torch.round(-lo / scale)


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2^b - 1] (as float32)."""
    return torch.round(x.float() / scale + zero).clamp(0, 2**bits - 1)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return ((act_codes(x, scale, zero, bits) - zero) * scale).to(x.dtype)


def fake_quant_act_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token (last-dim rows) asymmetric fake quantization of x [..., C]."""
    scale, zero = act_qparams(x.float().amin(-1, keepdim=True), x.float().amax(-1, keepdim=True), bits)
    return fake_quant_act(x, scale, zero, bits)


def act_range(x: torch.Tensor, observer: str, bits: int, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) an observer picks for one calibration batch x [..., C].

    minmax: the extremes; percentile: the ``percentile`` / (100 - percentile) quantiles of a sample;
    mse: the clip of [min, max] (shrunk towards 0) minimising the squared error of fake quantization.
    """
    x = x.detach().float().flatten()
    lo, hi = x.min(), x.max()
    if observer == "percentile":
        sample = x if x.numel() <= 2**20 else x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))
                                                [: 2**20]]
        lo, hi = torch.quantile(sample, (100 - percentile) / 100), torch.quantile(sample, percentile / 100)
    elif observer == "mse":
        best = None
        for c in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
            s, z = act_qparams(lo * c, hi * c, bits)
            err = ((fake_quant_act(x, s, z, bits) - x) ** 2).mean().item()
            if best is None or err < best[0]:
                best = (err, lo * c, hi * c)
        _, lo, hi = best
    return float(lo), float(hi)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ: round w [O,I] column by column, pushing each column's error onto the columns not yet rounded.

    hessian: [I,I] = sum of x^T x over the layer's calibration inputs. The grid is the same symmetric
    per-channel (or per-group, its scale taken when the group starts) grid as RTN. Returns the dequantized
    float32 weights, which lie exactly on that grid.
    """
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = qmax_signed(bits)
    out = torch.zeros_like(w)
    scale = weight_scale(w, bits)[:, 0] if not group_size else None
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            col = i1 + i
            if group_size and col % group_size == 0:  # the group's scale, from the error-updated weights
                g = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group_size]
                scale = (g.abs().amax(1).clamp_min(EPS)) / q
            wq = torch.round(w1[:, i] / scale).clamp(-q, q) * scale
            out[:, col] = wq
            err = (w1[:, i] - wq) / hinv[col, col]
            w1[:, i:] -= err[:, None] * hinv[col, col:i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out

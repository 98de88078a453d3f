"""The activation side of the W8A8 CPU path: the uint8 codes oneDNN's int8 linear takes.

Static grids (one scale per tensor): round(x / scale) + zero point on [0, 255] (zero point 128: the symmetric grid,
+-127). Per token: each row symmetric on +-qmax, or (asymmetric) on its own uint8 grid over [min(lo, 0), max(hi, 0)].
Shapes: x [M, K] (M rows: tokens of the batch), scales and zero points [M, 1] per row.
"""

from __future__ import annotations

import torch

from . import ops

QMAX = 127

SYMMETRIC_ZERO = QMAX + 1  # the static grid's zero point that stands for the symmetric grid (codes 1..255 = +-127)


def lowest_code(zero: int) -> int:
    """The lowest uint8 code of a static grid: 1 on the symmetric one (+-127, as before zero points were stored and
    as the per-token path), 0 on an asymmetric one."""
    return 1 if zero == SYMMETRIC_ZERO else 0


CHUNK = 1 << 18  # elements per row block of the activation quantizer: its float temporaries stay in cache


def to_uint8(x: torch.Tensor, scale: float | None, qmax: int = QMAX, zero: int = SYMMETRIC_ZERO,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> (uint8 codes [M, K], per-row scales fp32 [M, 1] when ``scale`` is None).

    Per row (``scale`` None): symmetric, round half to even, clamped to +-qmax and shifted by qmax + 1: at qmax 127
    the codes of ``quantize_per_token_ref``; qmax 63 is the 7-bit grid of CPUs without VNNI. Static (one
    ``scale``): round(x / scale) + ``zero``, clamped to [:func:`lowest_code`, 255] (zero 128: the symmetric grid).
    Done in row blocks:
    on whole [M, K] tensors the four elementwise passes go to memory (ViT-B fc2 at batch 16: 51 ms, against 9 ms
    in blocks)."""
    out = torch.empty(x.shape, dtype=torch.uint8)
    scales = None if scale is not None else torch.empty(x.shape[0], 1)
    rows = max(1, CHUNK // max(1, x.shape[1]))
    own = x.dtype != torch.float32  # .float() made a copy we may overwrite; an fp32 input is the caller's
    for i in range(0, x.shape[0], rows):
        xi = x[i:i + rows].float()
        if scale is None:
            scales[i:i + rows] = si = xi.abs().amax(1, keepdim=True).clamp_min_(ops.EPS).div_(qmax)
        else:
            si = scale
        xi = xi.div_(si) if own else xi.div(si)
        if scale is None:
            out[i:i + rows] = xi.round_().clamp_(-qmax, qmax).add_(qmax + 1)
        else:
            out[i:i + rows] = xi.round_().add_(zero).clamp_(lowest_code(zero), 255)
    return out, scales


def to_uint8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (uint8 codes [M, K], scales fp32 [M, 1], zero points fp32 [M, 1]): each row on the uint8 grid over
    its own range (widened to hold 0), as :func:`quantize_per_token_asym`; in row blocks like :func:`to_uint8`."""
    out = torch.empty(x.shape, dtype=torch.uint8)
    scales, zeros = torch.empty(x.shape[0], 1), torch.empty(x.shape[0], 1)
    rows = max(1, CHUNK // max(1, x.shape[1]))
    own = x.dtype != torch.float32  # .float() made a copy we may overwrite; an fp32 input is the caller's
    for i in range(0, x.shape[0], rows):
        xi = x[i:i + rows].float()
        si, zi = row_grid(xi)
        scales[i:i + rows], zeros[i:i + rows] = si, zi
        out[i:i + rows] = (xi.div_(si) if own else xi.div(si)).round_().add_(zi).clamp_(0, 255)
    return out, scales, zeros


def row_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [M, K]: (scale [M, 1], zero point [M, 1]) of the uint8 grid over [min(lo, 0), max(hi, 0)]."""
    lo, hi = x.amin(1, keepdim=True).clamp_max(0), x.amax(1, keepdim=True).clamp_min(0)
    s = (hi - lo).clamp_min(ops.EPS) / 255
    return s, torch.round(-lo / s).clamp_(0, 255)


def quantize_per_token_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes - 128 as int8 [M, K], scales fp32 [M], zero points fp32 [M]): each row on its own uint8
    grid (scale (hi - lo) / 255, zero point round(-lo / scale)), round half to even. The int8 GEMM multiplies the
    codes - 128; each row's zero point then adds (128 - z) x the weight codes' row sums."""
    xf = x.float()
    s, z = row_grid(xf)
    q = (torch.round(xf / s) + z).clamp(0, 255).sub(SYMMETRIC_ZERO).to(torch.int8)
    return q, s[:, 0], z[:, 0]

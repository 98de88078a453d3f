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


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, ste: bool = False,
              ) -> torch.Tensor:
    """Unsigned codes in [0, 2^b - 1] (as float32). ste: the rounding passes the gradient straight through
    (LSQ), so the scale gets its gradient inside the range."""
    u = x.float() / scale + zero
    r = u + (torch.round(u) - u).detach() if ste else torch.round(u)
    return r.clamp(0, 2**bits - 1)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, ste: bool = False,
                   ) -> torch.Tensor:
    return ((act_codes(x, scale, zero, bits, ste) - zero) * scale).to(x.dtype)


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
                  damp: float = 0.01, block: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: round w [O,I] column by column, pushing each column's error onto the columns not yet rounded.

    hessian: [I,I] = sum of x^T x over the layer's calibration inputs. The grid is the same symmetric
    per-channel (or per-group) grid as RTN. ``act_order`` rounds the columns in descending order of the Hessian's
    diagonal (GPTQ's act-order). Group scales: taken when the group starts, from the error-updated weights, in
    column order; with ``act_order``, from the original weights' contiguous groups before any rounding (the
    reference's ``static_groups``), since permuted columns no longer arrive group by group. Returns the
    dequantized float32 weights [O,I], which lie exactly on that grid, and the scales ([O,1] or [O, I/g, 1]).
    """
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    q = qmax_signed(bits)
    static = weight_scale(w, bits, group_size)[..., 0] if group_size and act_order else None  # [O, I/g]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    scale = weight_scale(w, bits)[:, 0] if not group_size else None
    scales = [] if group_size else [scale]
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale = static[:, int(perm[col]) // group_size]
            elif group_size and col % group_size == 0:  # the group's scale, from the error-updated weights
                g = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group_size]
                scale = (g.abs().amax(1).clamp_min(EPS)) / q
                scales.append(scale)
            wq = torch.round(w1[:, i] / scale).clamp(-q, q) * scale
            out[:, col] = wq
            err = (w1[:, i] - wq) / hinv[col, col]
            w1[:, i:] -= err[:, None] * hinv[col, col:i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = out[:, torch.argsort(perm)]
    if static is not None:
        return out, static[..., None]
    return out, torch.stack(scales, 1)[..., None] if group_size else scales[0][:, None]


ADALOG_R = 37  # AdaLog's reference: base 2^(q / 37), q an integer searched over 10 .. 110
# PTQ4ViT: Delta_R1 = Delta_R2 / 2^m, down to 2^-19 (the reference's smallest) at 4 bits, beyond it at 8
SOFTMAX_SEARCH = {"twin": tuple(float(m) for m in range(17)),
                  # AdaLog: codes per octave r = 37 / q, i.e. base 2^(q / 37), the reference's grid of q
                  "adalog": tuple(ADALOG_R / q for q in range(10, 111))}


def softmax_codes(p: torch.Tensor, scale: torch.Tensor | float, bits: int, kind: str,
                  param: float | torch.Tensor | None = None) -> torch.Tensor:
    """Codes (float32) of attention probabilities p [..., N] in [0, scale], for the softmax quantizers.

    uniform: round(p / (scale / (2^b - 1))) in [0, 2^b - 1].
    log2: round(-log2(p / scale)); logsqrt2: round(-2 log2(p / scale)), i.e. a base-sqrt(2) grid (RepQ-ViT);
    adalog: round(-r log2(p / scale)) with r = ``param`` codes per octave, i.e. base 2^(1/r) (AdaLog's adaptive
    base, searched per layer). On the log grids, codes 0 .. 2^b - 2 are powers and the top code 2^b - 1 stands
    for 0 (values too small to reach the grid, and exact zeros), so a b-bit code holds every level.
    twin: see :func:`twin_uniform` (its codes carry the range in the top bit).
    """
    top = 2**bits - 1
    p = p.float()
    if kind == "uniform":
        return torch.round(p / (torch.as_tensor(scale, dtype=torch.float32) / top)).clamp(0, top)
    if kind == "twin":
        return twin_uniform(p, bits, param)[0]
    per_octave = {"logsqrt2": 2.0, "log2": 1.0}.get(kind) or float(param)  # type: ignore[arg-type]
    codes = torch.round(-per_octave * torch.log2(p / scale)).clamp_min(0)  # p = 0 gives +inf
    return torch.where(codes >= top, torch.full_like(codes, top), codes)


def twin_uniform(p: torch.Tensor, bits: int, m: float | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PTQ4ViT's twin uniform quantizer of post-softmax values p in [0, 1]: two (b-1)-bit uniform ranges,
    R2 with step Delta_R2 = 2^-(b-1) over [0, 1] and R1 with step Delta_R1 = Delta_R2 / 2^m for the many small
    values; a value takes R1 when it fits there. Returns (codes: R1 codes as they are, R2 codes + 2^(b-1), the
    dequantized values)."""
    half = 2 ** (bits - 1)
    d2 = 1.0 / half
    d1 = d2 / 2.0 ** torch.as_tensor(0.0 if m is None else m, dtype=torch.float32)
    q1 = torch.round(p / d1)
    in_r1 = q1 <= half - 1
    q2 = torch.round(p / d2).clamp(0, half - 1)
    codes = torch.where(in_r1, q1, q2 + half)
    return codes, torch.where(in_r1, q1 * d1, q2 * d2)


def softmax_dequant(codes: torch.Tensor, scale: torch.Tensor | float, bits: int, kind: str,
                    param: float | torch.Tensor | None = None) -> torch.Tensor:
    """float32 probabilities from :func:`softmax_codes`' codes."""
    top = 2**bits - 1
    if kind == "uniform":
        return codes * (torch.as_tensor(scale, dtype=torch.float32) / top)
    if kind == "twin":
        half = 2 ** (bits - 1)
        d2 = 1.0 / half
        d1 = d2 / 2.0 ** torch.as_tensor(0.0 if param is None else param, dtype=torch.float32)
        return torch.where(codes < half, codes * d1, (codes - half) * d2)
    per_octave = {"logsqrt2": 2.0, "log2": 1.0}.get(kind) or float(param)  # type: ignore[arg-type]
    return torch.where(codes == top, torch.zeros_like(codes), scale * torch.exp2(-codes / per_octave))


def fake_quant_softmax(p: torch.Tensor, scale: torch.Tensor | float, bits: int, kind: str,
                       param: float | torch.Tensor | None = None) -> torch.Tensor:
    return softmax_dequant(softmax_codes(p, scale, bits, kind, param), scale, bits, kind, param).to(p.dtype)


# R2's top as a share of the observed maximum: PTQ4ViT's 100 candidates (eq_alpha 0.01, eq_beta 1.2, eq_n 100)
GELU_SEARCH = tuple(round(float(a), 4) for a in torch.linspace(0.01, 1.2, 100))


def twin_gelu(x: torch.Tensor, bits: int, d_neg: torch.Tensor | float, d_pos: torch.Tensor | float) -> torch.Tensor:
    """PTQ4ViT's twin uniform quantizer of post-GELU values x (fake-quantized, dtype kept): a sign bit picks one of
    two (b-1)-bit ranges, R1 = [-2^(b-1) d_neg, 0] for the negative values (GELU's lie in [-0.17, 0], so a fine
    step keeps them) and R2 = [0, (2^(b-1) - 1) d_pos] for the positive ones."""
    half = 2 ** (bits - 1)
    xf = x.float()
    neg = torch.round(xf / d_neg).clamp(-half, 0) * d_neg
    pos = torch.round(xf / d_pos).clamp(0, half - 1) * d_pos
    return torch.where(xf < 0, neg, pos).to(x.dtype)


GELU_SHIFT = 0.1700  # AdaLog's bias: -min GELU(x) = 0.16997, so that x + shift >= 0 (folded into fc2's bias)


def adalog_gelu(x: torch.Tensor, bits: int, scale: torch.Tensor | float, r: torch.Tensor | float) -> torch.Tensor:
    """AdaLog's post-GELU quantizer (fake-quantized, dtype kept): x + GELU_SHIFT on the adaptive log grid of base
    2^(1/r) below ``scale`` (as its softmax quantizer: the top code stands for 0), then the shift removed. In
    deployment the shift folds into the next layer's bias (W (y - b) = W y - W b), which is the bias
    reparameterization that lets a log grid hold GELU's negative values."""
    y = (x.float() + GELU_SHIFT).clamp_min(0)
    return (fake_quant_softmax(y, scale, bits, "adalog", r) - GELU_SHIFT).to(x.dtype)


def post_gelu_candidates(kind: str) -> tuple[float, ...]:
    """The searched parameter of a post-GELU quantizer: twin's R2 top as a share of the maximum, adalog's r."""
    return GELU_SEARCH if kind == "twin" else SOFTMAX_SEARCH["adalog"]


def post_gelu_grid(kind: str, bits: int, lo: float, hi: float, param: float) -> dict[str, float]:
    """A post-GELU quantizer's buffers from the observed range [lo, hi] and its searched parameter: twin's steps
    (a_neg_scale: R1 covers lo; a_scale: R2 tops at param x hi), or adalog's top (a_scale) and base (a_param)."""
    if kind == "twin":
        half = 2 ** (bits - 1)
        return {"a_neg_scale": max(-lo, EPS) / half, "a_scale": max(param * hi, EPS) / (half - 1)}
    return {"a_scale": max(hi + GELU_SHIFT, EPS), "a_param": param}


def post_gelu_quant(x: torch.Tensor, bits: int, kind: str, lo: float, hi: float, param: float) -> torch.Tensor:
    """A post-GELU quantizer set from the observed range [lo, hi] and its searched parameter."""
    g = post_gelu_grid(kind, bits, lo, hi, param)
    if kind == "twin":
        return twin_gelu(x, bits, g["a_neg_scale"], g["a_scale"])
    return adalog_gelu(x, bits, g["a_scale"], g["a_param"])


def gelu_search_errors(x: torch.Tensor, weight: torch.Tensor, bits: int, grad: torch.Tensor | None = None,
                       kind: str = "twin") -> torch.Tensor:
    """Each candidate's (:func:`post_gelu_candidates`) error at the next layer's output: [C]. x [..., I] post-GELU
    values, weight [O, I]; the grid is set from this batch's range. The error is sum(((q(x) - x) W^T)^2), weighted
    elementwise by grad^2 (grad [..., O], the task loss's gradient at the output: PTQ4ViT's Hessian-guided metric)
    when given."""
    x, w = x.detach().float(), weight.detach().float()
    lo, hi = float(x.min()), float(x.max())
    g2 = None if grad is None else grad.detach().float() ** 2
    out = []
    for c in post_gelu_candidates(kind):
        d = (post_gelu_quant(x, bits, kind, lo, hi, c) - x) @ w.t()
        out.append((d * d if g2 is None else g2 * d * d).sum())
    return torch.stack(out)


def softmax_search_errors(p: torch.Tensor, scale: float, bits: int, kind: str, v: torch.Tensor | None = None,
                          grad: torch.Tensor | None = None) -> torch.Tensor:
    """Each :data:`SOFTMAX_SEARCH` candidate's error on observed probabilities p [B,H,N,N]: [C].

    Without ``v``: the squared error of the probabilities. With v [B,H,N,Dh] and grad [B,H,N,Dh] (the task loss's
    gradient at the attention output O = p v): PTQ4ViT's Hessian-guided metric, sum(grad^2 * (O_q - O)^2), the
    output error weighted by a diagonal Fisher approximation of the Hessian.
    """
    if v is not None and grad is not None:
        p, v, g2 = p.detach().float(), v.detach().float(), grad.detach().float() ** 2
        out = p @ v
        return torch.stack([(g2 * (fake_quant_softmax(p, scale, bits, kind, c) @ v - out) ** 2).sum()
                            for c in SOFTMAX_SEARCH[kind]])
    p = p.detach().float().flatten()
    if p.numel() > 2**20:  # a fixed subsample keeps the search cheap on big models
        p = p[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[: 2**20]]
    return torch.stack([((fake_quant_softmax(p, scale, bits, kind, c) - p) ** 2).sum()
                        for c in SOFTMAX_SEARCH[kind]])


FP8_MAX = 448.0  # largest finite float8 e4m3fn


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Scale mapping ``absmax`` onto the e4m3 range (shape kept: per tensor, channel or token)."""
    return absmax.float().clamp_min(EPS) / FP8_MAX


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 e4m3fn values of x / scale (saturated, round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (fp8_codes(x, scale).float() * scale).to(x.dtype)


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token e4m3 fake quantization of x [..., C]."""
    return fake_quant_fp8(x, fp8_scale(x.detach().abs().amax(-1, keepdim=True)))

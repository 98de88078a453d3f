"""Token reduction as pure tensor functions (no modules, no timm): the algorithms, kept apart from the glue.

Shapes: B batch, N tokens, C channels, P protected prefix tokens (CLS, distillation, registers). Prefix
tokens are never merged, dropped or used as merge destinations: every function here works on
``x[:, P:]`` and re-attaches the prefix unchanged in front. ``size`` [B,N,1] counts how many original
patches each token stands for (float, 1 at the start).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Merge = Callable[[torch.Tensor, str], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Merge:
    """ToMe's bipartite soft matching (Bolya et al., 2023). metric: [B,N,C] (keys averaged over heads).

    As in the reference, *all* tokens alternate into sets A (even positions) and B (odd), prefix tokens
    included; a prefix token in A never merges (its edges score -inf) and one in B never receives (its column
    scores -inf). Each A token's edge is its most similar B token (cosine); the ``r`` strongest edges merge
    their A token into the B token. ``r`` is clamped to ``(N - protected) // 2`` as the reference does. With a
    prefix, the unmerged A tokens keep their original order (the next layer's alternation depends on it);
    without one they stay in score order, as in the reference. Returns ``merge(x [B,N,D], mode) ->
    [B,N-r,D]`` with the prefix first and unchanged; ``mode`` is a ``scatter_reduce`` reduction (``sum``, ...).
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    r = min(r, (metric.shape[1] - protected) // 2)
    if r == 0:
        return lambda x, mode="sum": x
    a_pre, b_pre = (protected + 1) // 2, protected // 2  # prefix tokens that fall in A (even) and B (odd)
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
        # only non-empty slices: an assignment to an empty one breaks the ONNX tracer at a static batch size
        if a_pre:
            scores[:, :a_pre, :] = -math.inf
        if b_pre:
            scores[:, :, :b_pre] = -math.inf
        best, best_idx = scores.max(dim=-1)  # [B, Na]
        order = best.argsort(dim=-1, descending=True)[..., None]  # [B, Na, 1]
        keep_idx, src_idx = order[:, r:], order[:, :r]
        dst_idx = best_idx[..., None].gather(1, src_idx)
        if protected:
            keep_idx = keep_idx.sort(dim=1).values  # the prefix (lowest indices) first, then original order

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        d = x.shape[-1]
        kept = a.gather(1, keep_idx.expand(-1, -1, d))
        src = a.gather(1, src_idx.expand(-1, -1, d))
        b = b.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce=mode)
        # the reference's order is [kept, b]; the prefix tokens of both sets go in front, in their own order
        return torch.cat([x[:, :protected], kept[:, a_pre:], b[:, b_pre:]], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B,N,C] as a size-weighted average; returns (x [B,N-r,C], size [B,N-r,1])."""
    merged = merge(x * size, "sum")
    size = merge(size, "sum")
    return merged / size, size


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """Track which original tokens each token holds. source: [B,N,N0] 0/1 -> [B,N-r,N0]."""
    return merge(source, "amax")


def keep_topk_fuse(x: torch.Tensor, size: torch.Tensor, score: torch.Tensor, drop: int, protected: int = 0,
                   source: torch.Tensor | None = None, normalize: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EViT: keep the patch tokens with the highest ``score``, fuse the other ``drop + 1`` into one token.

    x: [B,N,C]; size: [B,N,1]; score: [B,N-P] attention from CLS to each patch token (mean over heads).
    The fused token is appended last. As in EViT it is the sum of the inattentive tokens weighted by their
    CLS attention, not renormalised; ``normalize`` gives our earlier variant instead, the (score x size)-
    weighted average. Returns tokens [B,N-drop,C], their sizes and, when given, their source map.
    """
    n_patch = x.shape[1] - protected
    n_fuse = drop + 1
    if drop <= 0:
        return x, size, source
    if n_fuse > n_patch:
        raise ValueError(f"cannot fuse {n_fuse} of {n_patch} patch tokens")
    order = score.argsort(dim=-1, descending=True)
    keep_idx, fuse_idx = order[:, : n_patch - n_fuse, None], order[:, n_patch - n_fuse:, None]

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t[:, protected:].gather(1, idx.expand(-1, -1, t.shape[-1]))

    w = score.gather(1, fuse_idx[..., 0])[..., None].to(size.dtype)  # [B,F,1]
    if normalize:
        w = w * take(size, fuse_idx)
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    fused = (take(x, fuse_idx) * w.to(x.dtype)).sum(1, keepdim=True)
    x = torch.cat([x[:, :protected], take(x, keep_idx), fused], 1)
    fused_size = take(size, fuse_idx).sum(1, keepdim=True)
    size = torch.cat([size[:, :protected], take(size, keep_idx), fused_size], 1)
    if source is not None:
        fused_src = take(source, fuse_idx).amax(1, keepdim=True)
        source = torch.cat([source[:, :protected], take(source, keep_idx), fused_src], 1)
    return x, size, source


def ats_keep(score: torch.Tensor, samples: int) -> torch.Tensor:
    """ATS (Fayyaz et al., 2022): which patch tokens inverse-transform sampling keeps. score: [B,M] >= 0
    (CLS attention x value norm; 0 for padding, never kept) -> bool [B,M].

    As in the reference: sort the normalised scores ascending, take their CDF rescaled to [0, 1], place
    ``samples`` evenly spaced points from the first non-zero CDF value to 1 (deterministic, as at inference),
    and keep the token whose CDF value is nearest to each point. Strong tokens own long stretches of the CDF
    and are drawn repeatedly, so the number of distinct tokens kept varies per image.
    """
    b, m = score.shape
    p = score.float() / score.float().sum(1, keepdim=True).clamp_min(1e-12)
    sorted_p, order = p.sort(dim=1)
    cdf = sorted_p.cumsum(1)
    lo, hi = cdf[:, :1], cdf[:, -1:]
    cdf = (cdf - lo) / (hi - lo).clamp_min(1e-12)  # [B,M] in [0, 1]
    start = torch.where(cdf > 0, cdf, torch.full_like(cdf, 2.0)).amin(1, keepdim=True).clamp(max=1.0)
    steps = torch.linspace(0, 1, max(samples, 1), device=score.device)[None]
    ys = start + (1 - start) * steps  # [B,S]
    pick = (ys[:, :, None] - cdf[:, None, :]).abs().argmin(-1)  # [B,S] positions in the sorted order
    keep = torch.zeros(b, m, dtype=torch.bool, device=score.device)
    keep.scatter_(1, order.gather(1, pick), True)
    return keep & (score > 0)


def mass_keep(score: torch.Tensor, mass: float) -> torch.Tensor:
    """Keep, per image, the fewest highest-scoring patch tokens whose share of the total score reaches
    ``mass`` (a top-p threshold: a peaked image keeps few tokens, a diffuse one many). score: [B,M] -> bool."""
    p = score.float() / score.float().sum(1, keepdim=True).clamp_min(1e-12)
    sorted_p, order = p.sort(dim=1, descending=True)
    before = sorted_p.cumsum(1) - sorted_p  # mass of the stronger tokens
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, order, before < mass)
    return keep & (score > 0)


def bipartite_edges(metric: torch.Tensor, size: torch.Tensor, protected: int = 0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite graph without a fixed r: every A token's (even positions) best B token (odd positions).

    metric [B,N,C] (keys averaged over heads), size [B,N,1] (0: padding). Prefix and padding tokens neither
    merge nor receive. Returns (similarity of each A token's best edge [B,Na] (-inf where it may not merge),
    its rank among the image's edges [B,Na] (0 = most similar), the A and B positions [Na], [Nb], and the
    destination of each A token as an index into B [B,Na]).
    """
    n = metric.shape[1]
    a_pos, b_pos = torch.arange(0, n, 2, device=metric.device), torch.arange(1, n, 2, device=metric.device)
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # [B, Na, Nb]
        blocked = size[..., 0] <= 0
        blocked[:, :protected] = True
        scores = scores.masked_fill(blocked[:, a_pos, None] | blocked[:, None, b_pos], -math.inf)
        best, dst = scores.max(dim=-1)
        rank = best.argsort(dim=-1, descending=True).argsort(dim=-1)
    return best, rank, a_pos, b_pos, dst


def weighted_merge(x: torch.Tensor, size: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor,
                   dst: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each A token into its destination with weight w [B,Na] in [0, 1], keeping every position.

    The destination becomes the size-weighted average with w x size of each source; a source keeps its value
    with size x (1 - w). With w in {0, 1} this is ToMe's merge (a merged token's size drops to 0, and
    :func:`pack_tokens` removes it); in between it is the differentiable relaxation learned thresholds and
    rates train through. x [B,N,C], size [B,N,1] -> (x, size), same shapes.
    """
    wa = w[..., None] * size[:, a_pos]  # [B,Na,1] the share of each source that moves
    idx = dst[..., None]
    num = (x[:, b_pos] * size[:, b_pos]).scatter_add(1, idx.expand(-1, -1, x.shape[-1]), wa * x[:, a_pos])
    den = size[:, b_pos].scatter_add(1, idx, wa)
    live = den > 0  # a destination that is itself merged away (size 0) keeps its value; the safe divisor keeps
    x_b = torch.where(live, num / torch.where(live, den, torch.ones_like(den)), x[:, b_pos])  # NaN out of grads
    x, size = x.clone(), size.clone()
    x[:, b_pos], size[:, b_pos] = x_b, den
    size[:, a_pos] = size[:, a_pos] - wa
    return x, size


def pack_tokens(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, protected: int,
                source: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move each image's kept tokens to the front (prefix first, then the kept patches in their order) and pad
    to the batch's longest. x [B,N,C], size [B,N,1], keep [B,N-P] bool. Returns x [B,L,C] (padding zero),
    size [B,L,1] (padding 0, so ``log size`` masks it as a key), lens [B] and the source map."""
    full = torch.cat([keep.new_ones(keep.shape[0], protected), keep], 1)
    lens = full.sum(1)
    width = int(lens.max())
    idx = (~full).to(torch.int8).sort(dim=1, stable=True).indices[:, :width]  # kept first, order preserved
    valid = (torch.arange(width, device=x.device)[None] < lens[:, None])[..., None]  # [B,L,1]

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) * valid.to(t.dtype)

    return take(x), take(size), lens, None if source is None else take(source)


def size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention: ``log(size)`` as an additive per-key bias [B,1,1,N] for SDPA's float mask."""
    if size is None:
        return None
    return size.log()[:, None, None, :, 0].to(dtype)


def weighted_pool(x: torch.Tensor, size: torch.Tensor, protected: int) -> torch.Tensor:
    """Global average pooling of the patch tokens weighted by size: [B,N,C] -> [B,C]."""
    w = size[:, protected:].to(x.dtype)
    return (x[:, protected:] * w).sum(1) / w.sum(1)


# ---------------------------------------------------------------------------------------------- schedules
def constant_schedule(r: int, depth: int, inflection: float = 0.0) -> list[int]:
    """ToMe's ``(r, inflection)`` schedule: ``r`` per layer on average, tilted linearly.

    inflection 0: constant; -1: from 2r in the first layer down to 0 in the last; +1: the reverse.
    A whole ``r`` gives the reference's schedule exactly (ToMe's ``parse_r``: each layer's point of the linear ramp,
    truncated, so ``(16, -1)`` on 12 layers removes 187 tokens, not 192). A fractional ``r`` (what the solvers ask
    for) gets whole tokens rounded cumulatively, so that it still removes r x depth tokens in all.
    """
    if depth == 1:
        return [int(r)]
    if float(r).is_integer():
        min_val = int(r * (1.0 - inflection))
        step = (2 * r - 2 * min_val) / (depth - 1)  # (max_val - min_val), max_val = 2r - min_val, as the reference
        return [int(min_val + step * i) for i in range(depth)]
    lo = r * (1.0 - inflection)
    hi = 2 * r - lo
    out, total, done = [], 0.0, 0
    for i in range(depth):  # cumulative rounding: a fractional r still removes r x depth tokens in all
        total += lo + (hi - lo) * i / (depth - 1)
        cur = math.floor(total + 1e-9)
        out.append(cur - done)
        done = cur
    return out


def keep_count(n_patch: int, keep_rate: float) -> int:
    """EViT: how many of ``n_patch`` tokens a keep-rate keeps (at least 1)."""
    return max(1, math.ceil(keep_rate * n_patch))

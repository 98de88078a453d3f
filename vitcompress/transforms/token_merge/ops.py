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
        scores[:, :a_pre, :] = -math.inf
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
    ``r`` may be fractional (the solvers use that); layers get whole tokens, rounded cumulatively.
    """
    if depth == 1:
        return [int(r)]
    lo = r * (1.0 - inflection)
    hi = 2 * r - lo
    out, total, done = [], 0.0, 0
    for i in range(depth):  # cumulative rounding: a fractional r still removes r x depth tokens in all
        total += lo + (hi - lo) * i / (depth - 1)
        cur = math.floor(total + 1e-9)
        out.append(cur - done)
        done = cur
    return out


def token_counts(n_tokens: int, schedule: list[int]) -> list[tuple[int, int]]:
    """Per layer (tokens into attention, tokens into the MLP), with ``schedule[l]`` removed in between."""
    out, n = [], n_tokens
    for r in schedule:
        out.append((n, n - r))
        n -= r
    return out


def block_flops(n_attn: int, n_mlp: int, dim: int, hidden: int, attn_dim: int | None = None) -> int:
    """FLOPs (2 x MACs) of one ViT block: qkv + attention matmuls + proj on n_attn tokens, MLP on n_mlp.

    attn_dim: heads x head_dim of this block (default ``dim``; smaller after head pruning); hidden: its MLP width.
    """
    a = dim if attn_dim is None else attn_dim
    return 2 * n_attn * dim * 3 * a + 4 * n_attn * n_attn * a + 2 * n_attn * a * dim + 4 * n_mlp * dim * hidden


def keep_count(n_patch: int, keep_rate: float) -> int:
    """EViT: how many of ``n_patch`` tokens a keep-rate keeps (at least 1)."""
    return max(1, math.ceil(keep_rate * n_patch))

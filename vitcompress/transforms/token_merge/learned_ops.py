"""LTMP's and DiffRate's token reduction as pure tensor functions, one function per method for training and
inference alike (no modules, no timm).

Both papers train with every token kept and a mask [B,N] in {0, 1} instead: a removed token's mask goes to 0,
the attention weighs each key by its mask (``attention(key_weight=mask)``), and the hard 0/1 values carry the
gradient of a relaxation (straight through). Inference removes what the mask removes. Shapes as in ``ops``:
x [B,N,C], size [B,N,1] (patches per token), P protected prefix tokens that are never merged or pruned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Gate = Callable[[torch.Tensor], torch.Tensor]  # values -> {0, 1} (straight-through in training), same shape


def threshold_gate(theta: torch.Tensor | float, tau: float) -> Gate:
    """LTMP's threshold masking: 1 where value > theta; the gradient is that of sigmoid((value - theta) / tau)."""
    def gate(values: torch.Tensor) -> torch.Tensor:
        hard = (values > theta).to(values.dtype)
        if not isinstance(theta, torch.Tensor) or not theta.requires_grad:
            return hard
        soft = torch.sigmoid((values - theta) / tau).nan_to_num(0.0)  # -inf (blocked) -> 0
        return hard + (soft - soft.detach())
    return gate


def ltmp_reduce(x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor,
                importance: torch.Tensor, merge: Gate, prune: Gate, protected: int = 1,
                source: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One LTMP step (Bonnaerens & Dambre, 2023), between a block's attention and its MLP.

    Merge: ToMe's bipartite split (even positions are sources, odd are destinations); a source merges into its
    most similar destination (cosine of the keys averaged over heads, keys [B,N,Dh]) where ``merge`` of that
    similarity is 1; a destination becomes the size-weighted average and takes the largest importance of what it
    receives. Prune: ``prune`` of the importance [B,N] (the attention a token receives, mean over heads and
    queries) masks the remaining tokens. The tokens are reordered as the reference does (sources, then
    destinations; the prefix first). mask [B,N] (1 live, 0 removed or padding) in and out; a removed source keeps
    its value and size (only its mask changes), so one function serves training and inference.
    Returns (x, size, mask, source), reordered.
    """
    b, n, c = x.shape
    a_pos, b_pos = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    live = mask.detach() > 0
    with torch.no_grad():
        m = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
        m = m * live[..., None]  # removed tokens are similar to nothing (the reference zeroes their metric)
        scores = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)
        blocked = ~live.clone()
        blocked[:, :protected] = True
        scores = scores.masked_fill(blocked[:, a_pos, None] | blocked[:, None, b_pos], -math.inf)
        best, dst = scores.max(dim=-1)  # [B,Na]
    w = merge(best) * live[:, a_pos]  # [B,Na] 1: this source merges and leaves
    moved = w.detach()[..., None].to(x.dtype)
    xs = x * size.to(x.dtype)
    idx = dst[..., None]
    dst_x = xs[:, b_pos].scatter_add(1, idx.expand(-1, -1, c), xs[:, a_pos] * moved)
    dst_s = size[:, b_pos].scatter_add(1, idx, size[:, a_pos] * moved.to(size.dtype))
    imp = importance.float().masked_fill(~live, 0.0)
    moved_imp = torch.where(w.detach() > 0, imp[:, a_pos], torch.zeros_like(imp[:, a_pos]))  # not inf x 0
    dst_imp = imp[:, b_pos].scatter_reduce(1, dst, moved_imp, "amax")
    src_mask = torch.where(live[:, a_pos], 1 - w, mask[:, a_pos])
    if source is not None:  # a destination now also holds its sources' patches
        moved_src = source[:, a_pos] * (w.detach() > 0)[..., None].to(source.dtype)
        dst_src = source[:, b_pos].scatter_reduce(1, idx.expand(-1, -1, source.shape[-1]), moved_src, "amax")
        source = torch.cat([source[:, a_pos], dst_src], 1)
    x = torch.cat([xs[:, a_pos], dst_x], 1) / torch.cat([size[:, a_pos], dst_s], 1).clamp_min(1e-6).to(x.dtype)
    size = torch.cat([size[:, a_pos], dst_s], 1)
    mask = torch.cat([src_mask, mask[:, b_pos]], 1)
    imp = torch.cat([imp[:, a_pos], dst_imp], 1)
    order = _prefix_first(a_pos, b_pos, protected)
    x, size, mask, imp = x[:, order], size[:, order], mask[:, order], imp[:, order]
    source = None if source is None else source[:, order]
    imp[:, :protected] = math.inf
    keep = prune(imp)
    mask = torch.where(mask.detach() > 0, keep.to(mask.dtype), mask)
    return x, size, mask, source


def _prefix_first(a_pos: torch.Tensor, b_pos: torch.Tensor, protected: int) -> torch.Tensor:
    """Positions in the [sources, destinations] concatenation, reordered so the prefix tokens come first (with one
    prefix token, the CLS at source 0, this is the reference's order unchanged)."""
    na = len(a_pos)
    cat = torch.cat([a_pos, b_pos])
    where = torch.cat([torch.arange(na, device=a_pos.device), na + torch.arange(len(b_pos), device=a_pos.device)])
    prefix = cat < protected
    return torch.cat([where[prefix], where[~prefix]])


# ------------------------------------------------------------------------------------------------- DiffRate
def kept_probability(logits: torch.Tensor, n_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's differentiable discrete proxy over kept patch-token counts n_patch, n_patch - 1, ..., 1.

    logits [n_patch] -> (kept count ceil(sum_c c softmax_c), straight through the ceiling; the probability that
    patch position j is kept, sum over candidates c > j of softmax_c [n_patch])."""
    cand = torch.arange(n_patch, 0, -1, device=logits.device, dtype=torch.float32)
    p = logits.float().softmax(-1)
    expected = cand @ p
    kept = expected + (torch.ceil(expected) - expected).detach()
    # candidate i keeps n_patch - i tokens, so position j is kept by the candidates i < n_patch - j
    return kept, p.cumsum(0).flip(0)


def count_mask(prob: torch.Tensor, kept: int, upto: int, protected: int) -> torch.Tensor:
    """DiffRate's token mask [P + n_patch]: 0 for patch positions in [kept, upto), 1 elsewhere (positions count
    patches only), with the gradient of the keep probabilities ``prob`` [n_patch] (straight through)."""
    hard = torch.ones_like(prob)
    hard[kept:upto] = 0
    patch = hard + (prob - prob.detach())
    return torch.cat([patch.new_ones(protected), patch])


def sort_by_attention(x: torch.Tensor, size: torch.Tensor, cls_attn: torch.Tensor, protected: int,
                      *rest: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """DiffRate's importance order: the patch tokens by CLS attention [B,N] descending, the prefix first.
    Returns x, size and each of ``rest`` ([B,N] or [B,N,K] or None) gathered in that order."""
    order = cls_attn[:, protected:].float().argsort(dim=-1, descending=True) + protected
    pre = torch.arange(protected, device=x.device).expand(x.shape[0], -1)
    idx = torch.cat([pre, order], 1)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dim() == 2:
            return t.gather(1, idx)
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
    return (take(x), take(size), *(take(t) for t in rest))


def diffrate_merge(x: torch.Tensor, size: torch.Tensor, keep: int, upto: int, protected: int,
                   source: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DiffRate's merge (Chen et al., 2023): tokens at positions [keep, upto) (the unimportant ones, after
    :func:`sort_by_attention`) merge into their most similar token among [P, keep) (cosine of the tokens
    themselves, not the keys). As in the reference, a destination becomes the plain mean of itself and what it
    receives, and its size grows by max(1, size x similarity) of each source. Positions >= ``keep`` keep their
    values (training masks them; inference drops them). x [B,N,C] -> same shapes."""
    if upto <= keep:
        return x, size, source
    with torch.no_grad():
        m = x[:, :upto].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = m[:, keep:upto] @ m[:, :keep].transpose(1, 2)  # [B, upto-keep, keep]
        sim[..., :protected] = -math.inf
        node_max, node_idx = sim.max(-1)
    idx = node_idx[..., None]
    # scatter "mean" with the destination included, as sums and counts (ONNX has no mean reduction)
    total = x[:, :keep].scatter_add(1, idx.expand(-1, -1, x.shape[-1]), x[:, keep:upto])
    count = torch.ones_like(size[:, :keep]).scatter_add(1, idx, torch.ones_like(size[:, keep:upto]))
    dst_x = total / count.to(x.dtype)
    src_s = (size[:, keep:upto] * node_max[..., None].to(size.dtype)).clamp_min(1.0)
    dst_s = size[:, :keep].clamp_min(1.0).scatter_add(1, idx, src_s)
    x = torch.cat([dst_x, x[:, keep:]], 1)
    size = torch.cat([dst_s, size[:, keep:]], 1)
    if source is not None:
        dst_src = source[:, :keep].scatter_reduce(1, idx.expand(-1, -1, source.shape[-1]), source[:, keep:upto],
                                                  "amax")
        source = torch.cat([dst_src, source[:, keep:]], 1)
    return x, size, source


def ste_min(n: torch.Tensor, prune: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """min(n, prune, merge) whose gradient flows to both kept counts, as DiffRate's FLOPs count does."""
    value = torch.minimum(torch.minimum(n.detach(), prune.detach()), merge.detach())
    return value + (prune - prune.detach()) + (merge - merge.detach())


def diffrate_reduce(x: torch.Tensor, size: torch.Tensor, cls_attn: torch.Tensor, prune: int, drop: int,
                    protected: int, source: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DiffRate at inference: sort by CLS attention [B,N], drop the last ``prune`` tokens, merge the next
    ``drop - prune`` into the rest. x [B,N,C] -> [B,N-drop,C] (fixed counts, static shapes)."""
    n = x.shape[1]
    x, size, source = sort_by_attention(x, size, cls_attn, protected, source)  # type: ignore[misc]
    upto, keep = n - prune, n - drop
    x, size, source = diffrate_merge(x[:, :upto], size[:, :upto], keep, upto, protected,
                                     None if source is None else source[:, :upto])
    return x[:, :keep], size[:, :keep], None if source is None else source[:, :keep]

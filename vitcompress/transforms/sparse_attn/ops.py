"""Block-sparse attention patterns as pure tensor functions (no modules, no timm).

Shapes: B batch, H heads, N tokens, D head width, bs the block edge, nb = ceil(N / bs) blocks. Block 0 holds
the prefix tokens (CLS, ...), which every query may always read, and the CLS query's block reads every key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def block_pool(t: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean of t [B,H,N,D] over each block of ``bs`` tokens (the last one partial) -> [B,H,nb,D]."""
    n = t.shape[2]
    nb = math.ceil(n / bs)
    padded = F.pad(t.float(), (0, 0, 0, nb * bs - n))
    counts = torch.full((nb,), float(bs), device=t.device)
    counts[-1] = n - (nb - 1) * bs
    return padded.unflatten(2, (nb, bs)).sum(3) / counts[:, None]


def keep_blocks(n: int, bs: int, density: float) -> int:
    """Key blocks each query block keeps so that the share of tiles computed, the CLS block's dense row
    included (see :func:`density`), is nearest to ``density``: at least 2 (the prefix and its own), at most all."""
    nb = math.ceil(n / bs)
    if nb <= 2:
        return nb
    return min(nb, max(2, round((density * nb * nb - nb) / (nb - 1))))


def block_mask(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, bs: int, density: float,
               scale: float) -> torch.Tensor:
    """Which (query block, key block) tiles to compute: bool [B,H,nb,nb].

    The predictor estimates how much attention each query block puts on each key block, at O(N x nb) cost
    instead of attention's O(N^2): every query scores each key block by its logit against the block's mean key
    plus the log of the block's key weight (its token count, or the log-sum-exp of ``bias`` [B,1,1,N]: log
    sizes, -inf for padding), a softmax over the key blocks turns that into attention shares, and a query
    block's share of a key block is the mean over its queries. Each query block keeps the ``keep_blocks``
    largest, always with key block 0 (the prefix) and its own diagonal block; the first query block (CLS)
    keeps every block.
    """
    n = q.shape[2]
    nb = math.ceil(n / bs)
    logits = (q.float() * scale) @ block_pool(k, bs).transpose(-2, -1)  # [B,H,N,nb]
    if bias is None:
        weight = torch.full((nb,), float(bs), device=q.device)
        weight[-1] = n - (nb - 1) * bs
        logits = logits + weight.log()
    else:
        pad = F.pad(bias[:, 0, 0, :].float(), (0, nb * bs - n), value=-math.inf)
        logits = logits + pad.unflatten(1, (nb, bs)).logsumexp(-1)[:, None, None, :]
    share = logits.softmax(-1).nan_to_num(0.0)  # [B,H,N,nb]
    score = block_pool(share, bs)  # [B,H,nb,nb] mean over each query block
    forced = torch.eye(nb, dtype=torch.bool, device=q.device)
    forced[:, 0] = True
    score = score.masked_fill(forced, math.inf)
    top = score.topk(keep_blocks(n, bs, density), dim=-1).indices
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    mask[..., 0, :] = True
    return mask


def token_mask(mask: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """Expand a block mask [B,H,nb,nb] to the token mask [B,H,N,N] it stands for."""
    return mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :n, :n]


def density(n: int, bs: int, keep: float) -> float:
    """The share of tiles computed at ``keep`` density: the CLS block's row is dense."""
    nb = math.ceil(n / bs)
    k = keep_blocks(n, bs, keep)
    return ((nb - 1) * k + nb) / (nb * nb)

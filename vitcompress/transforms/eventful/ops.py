"""Eventful's token gates as pure tensor functions.

A gate keeps a reference state ``ref`` [B,N,C]: the input each token had when it was last processed. On a new
input ``x`` [B,N,C] its error is ``x - ref``; a policy picks the tokens to re-process from the error's norm, and
the reference takes their new values (the others keep accumulating error until they are picked). A buffer [B,N,D]
holds the operation's last output per token; the picked tokens' new outputs are scattered into it.
"""

from __future__ import annotations

import torch


def error_norm(x: torch.Tensor, ref: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The L2 norm of each token's change: x, ref [B,N,C] -> [B,N]. scratch: a [B,N,C] buffer for x - ref (a
    fresh megabyte-sized tensor per gate and frame costs the CPU allocator page faults)."""
    diff = torch.sub(x, ref, out=scratch) if scratch is not None else x - ref
    return torch.linalg.vector_norm(diff, dim=-1)


def top_k(err: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tokens of largest error per stream: err [B,N] -> indices [B,k]."""
    return err.topk(min(k, err.shape[1]), dim=1, sorted=False).indices


def above(err: torch.Tensor, threshold: float) -> torch.Tensor:
    """The tokens whose error exceeds ``threshold``: err [B,N] -> indices [B,M], M = the largest count over the
    streams (a stream with fewer takes its next-largest errors too, so a batch stays one dense tensor).
    M = 0 when nothing changed by more than the threshold."""
    m = int((err > threshold).sum(1).max()) if err.numel() else 0
    return top_k(err, m)


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx [B,M] into rows of a [B,N,*] tensor -> indices [B*M] into its [B*N,*] view."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).flatten()


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,N,C], idx [B,M] -> x's picked tokens [B,M,C] (whole rows, copied by index_select: on a CPU a
    per-element gather of expanded indices costs several times more)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat(idx, n)).view(b, idx.shape[1], c)


def scatter_(buf: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """buf [B,N,D] (contiguous) with rows idx [B,M] replaced by values [B,M,D], in place; returns buf."""
    b, n, d = buf.shape
    buf.view(b * n, d).index_copy_(0, _flat(idx, n), values.reshape(-1, d).to(buf.dtype))
    return buf

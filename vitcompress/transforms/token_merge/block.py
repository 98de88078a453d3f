"""The timm glue that token reduction shares: :class:`ReducibleBlock` and the per-forward :class:`TokenState`.

Each timm ``Block`` keeps its own submodules and weights (so state-dict keys do not change); its class is
switched to :class:`ReducibleBlock`, whose forward calls those submodules: norm1, the attention's
qkv / q_norm / k_norm / norm / proj, ls1, drop_path1, norm2, mlp, ls2, drop_path2. Attention runs
through fused SDPA, with proportional attention (``log size`` per key) as its float mask. A block with
nothing to do and no merged tokens before it runs timm's own ``Block.forward``, so strength 0 is bit-exact.

Tokens are removed between a block's attention and its MLP, in one of two ways: a fixed count per layer
(ToMe merges, EViT keeps the top CLS-attended tokens and fuses the rest), or an adaptive count per image
(ATS-style): each image keeps what its significance scores select, the batch is packed to the longest and
the padding carries size 0, so ``log size`` = -inf masks it as a key (and the Triton kernel skips it by
``seq_lens``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ...config import StrEnum
from ...kernels._triton import Backend
from ..attention import attention
from ..tokens import STATE_ATTR
from . import learned_ops, ops


class TokenMethod(StrEnum):
    TOME = "tome"
    EVIT = "evit"  # the paper: fused token = CLS-attention-weighted sum of the inattentive tokens
    EVIT_WAVG = "evit_wavg"  # our earlier variant: normalised (attention x size) average, proportional attention
    DIFFRATE = "diffrate"  # learned (learned_merge): sort by CLS attention, prune the tail, merge the rest

    @property
    def is_evit(self) -> bool:
        return self in (TokenMethod.EVIT, TokenMethod.EVIT_WAVG)

    @property
    def needs_cls(self) -> bool:
        """Whether the reduction reads the CLS row of the attention."""
        return self.is_evit or self == TokenMethod.DIFFRATE


Selector = Callable[[torch.Tensor], torch.Tensor]  # significance [B,M] -> keep [B,M] bool
# (block index, best-edge similarity [B,Na], its rank [B,Na]) -> merge weight [B,Na] in [0, 1]
MergeWeights = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# (block index, x, size, mask [B,N], keys [B,N,Dh], importance [B,N], source) -> (x, size, mask, source)
MaskStep = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclasses.dataclass
class TokenState:
    """Shared by a model's reducible blocks during one forward (reset by the first block).

    select: the significance rule of the adaptive selection; step: a masked reduction on the importance scores
    (LTMP: what its mask removes leaves); merge_weights: the weights of the adaptive (threshold) merging (1: the
    token merges and leaves, and the batch is packed); ``soft``: training, where the weights carry
    straight-through gradients and ``expected`` [B] counts the tokens as a differentiable function of them;
    lens [B]: valid tokens per image once the batch is padded; trace: when a list, each block appends (tokens
    into attention [B], into the MLP [B]).
    """

    protected: int
    prop_attn: bool
    method: TokenMethod | None  # None: an adaptive method
    trace_source: bool = False
    backend: Backend = Backend.AUTO  # the merged layers' proportional attention
    select: Selector | None = None
    merge_weights: MergeWeights | None = None
    step: MaskStep | None = None
    soft: bool = False
    expected: torch.Tensor | None = None
    size: torch.Tensor | None = None  # [B,N,1] patches per token; None until the first reduction
    source: torch.Tensor | None = None  # [B,N,N0] when tracing
    lens: torch.Tensor | None = None
    trace: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # per-image counts: the statistics of a traced run, (model, forwards) -> dict (set by the adaptive methods;
    # evaluation calls it through this state, so it needs no import from the family)
    summarize: Callable[[nn.Module, list[list[tuple[torch.Tensor, torch.Tensor]]]], dict[str, Any]] | None = None

    def reset(self) -> None:
        self.size, self.source, self.lens, self.expected = None, None, None, None

    @contextlib.contextmanager
    def tracing(self, depth: int) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Record, for every forward run inside, the (tokens into attention [B], into the MLP [B]) of each of the
        ``depth`` blocks; yields the list of forwards, filled on exit."""
        forwards: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.trace = []
        try:
            yield forwards
        finally:
            flat, self.trace = self.trace, None
            forwards.extend(flat[i:i + depth] for i in range(0, len(flat), depth))

    @property
    def adaptive(self) -> bool:
        """Whether the token counts differ per image."""
        return self.select is not None or self.step is not None or (self.merge_weights is not None and not self.soft)


class ReducibleBlock(Block):
    """A timm ``Block`` that removes ``_vc_drop`` tokens (or, with ``_vc_adapt``, what the state's selector
    drops) between its attention and its MLP."""

    _vc_state: TokenState
    _vc_drop: int
    _vc_prune: int = 0  # DiffRate: of the _vc_drop tokens, how many are pruned (the rest merge)
    _vc_adapt: bool = False
    _vc_first: bool
    _vc_index: int = 0

    @property
    def _vc_dynamic_shapes(self) -> bool:
        """Whether this block's token count depends on the images (no fullgraph, no CUDA graph)."""
        return self._vc_adapt or self._vc_state.adaptive

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        st = self._vc_state
        if self._vc_first:
            st.reset()
        if attn_mask is not None or is_causal:
            raise ValueError("token reduction does not support attention masks")
        n_in = self._counts(x)
        if st.size is None and self._vc_drop == 0 and not self._vc_adapt:
            self._record(n_in, n_in)
            return Block.forward(self, x)
        evit = st.method is not None and st.method.needs_cls and self._vc_drop > 0
        size = st.size.clamp_min(1e-6) if st.soft and st.size is not None else st.size  # finite gradients
        bias = ops.size_bias(size, x.dtype) if st.prop_attn or st.lens is not None else None
        h, keys, cls = attention(self.attn, self.norm1(x), bias, cls_row=evit, backend=st.backend,
                                 seq_lens=st.lens, significance=self._vc_adapt and st.select is not None,
                                 importance=self._vc_adapt and st.step is not None)
        x = x + self.drop_path1(self.ls1(h))
        if self._vc_drop > 0:
            x = self._reduce(x, keys, cls)
        elif self._vc_adapt:
            x = self._adapt(x, keys, cls)
        self._record(n_in, self._counts(x))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _counts(self, x: torch.Tensor) -> torch.Tensor | None:
        """Valid tokens per image [B] of x [B,N,C] while tracing (else None)."""
        st = self._vc_state
        if st.trace is None:
            return None
        if st.expected is not None:  # soft merging: the expected count, differentiable
            return st.expected
        return (st.lens if st.lens is not None else torch.full((x.shape[0],), x.shape[1])).cpu()

    def _record(self, n_attn: torch.Tensor | None, n_mlp: torch.Tensor | None) -> None:
        if self._vc_state.trace is not None:
            self._vc_state.trace.append((n_attn, n_mlp))  # type: ignore[arg-type]

    def _start(self, x: torch.Tensor) -> None:
        st = self._vc_state
        if st.size is None:
            st.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
            if st.trace_source:
                st.source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)[None].expand(x.shape[0], -1, -1)

    def _adapt(self, x: torch.Tensor, keys: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        """Keep what the selector picks from the patch tokens' significance [B,N-P], or merge the pairs the
        merge weights pick from the keys [B,N,Dh]; pack and pad the batch."""
        st, p = self._vc_state, self._vc_state.protected
        self._start(x)
        if st.step is not None:
            assert score is not None and st.size is not None
            mask = (st.size[..., 0] > 0).float()
            x, st.size, mask, st.source = st.step(self._vc_index, x, st.size, mask, keys, score, st.source)
            keep = mask[:, p:] > 0
        elif st.merge_weights is not None:
            sim, rank, a_pos, b_pos, dst = ops.bipartite_edges(keys, st.size, p)
            w = st.merge_weights(self._vc_index, sim, rank)
            x, size = ops.weighted_merge(x, st.size.to(x.dtype), a_pos, b_pos, dst, w.to(x.dtype))
            st.size = size.float()
            if st.source is not None:  # a destination now also holds its sources' patches
                moved = st.source[:, a_pos] * (w > 0)[..., None].to(st.source.dtype)
                src = st.source.clone()
                src[:, b_pos] = src[:, b_pos].scatter_reduce(1, dst[..., None].expand(-1, -1, src.shape[-1]),
                                                             moved, "amax")
                st.source = src
            if st.soft:  # training: the count as a function of the weights (their values are the hard ones)
                n = st.expected if st.expected is not None else torch.full((x.shape[0],), float(x.shape[1]))
                st.expected = n - w.float().sum(1).cpu()
            keep = st.size[:, p:, 0] > 0
        else:
            keep = st.select(score[:, p:])  # type: ignore[misc, index]
        keep[:, 0] |= ~keep.any(1)  # never leave an image without a patch token
        x, st.size, lens, st.source = ops.pack_tokens(x, st.size, keep, p, st.source)
        st.lens = lens
        return x

    def _reduce(self, x: torch.Tensor, keys: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        st, p = self._vc_state, self._vc_state.protected
        self._start(x)
        if st.method == TokenMethod.DIFFRATE:
            assert cls is not None and st.size is not None
            x, st.size, st.source = learned_ops.diffrate_reduce(x, st.size, cls, self._vc_prune, self._vc_drop, p,
                                                                st.source)
            return x
        if cls is None:
            merge = ops.bipartite_soft_matching(keys, self._vc_drop, p)
            if st.source is not None:
                st.source = ops.merge_source(merge, st.source)
            x, st.size = ops.merge_wavg(merge, x, st.size.to(x.dtype))
            st.size = st.size.float()
            return x
        x, st.size, st.source = ops.keep_topk_fuse(x, st.size, cls[:, p:], self._vc_drop, p, st.source,
                                                   normalize=st.method == TokenMethod.EVIT_WAVG)
        return x


def _weighted_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """``VisionTransformer.pool`` for global-average models: weight merged tokens by their size (padding: 0)."""
    st: TokenState = self._vc_token_state
    if st.size is None or (pool_type or self.global_pool) != "avg":
        return type(self).pool(self, x, pool_type)
    return ops.weighted_pool(x, st.size, 0 if self.pool_include_prefix else st.protected)


def _size_aware_attn_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """``VisionTransformer.pool`` for attention-pool (MAP, SigLIP) models: the pool's query attends to each merged
    token as to ``size`` copies of it (ToMe's proportional attention, log(size) added to its logits; padding, of
    size 0, gets -inf), so merging identical tokens leaves the pooled features unchanged."""
    st: TokenState = self._vc_token_state
    if st.size is None:
        return type(self).pool(self, x, pool_type)
    size = st.size[..., 0]
    if not self.pool_include_prefix:
        x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
    return self.attn_pool(x, attn_mask=size.log().to(x.dtype)[:, None, None, :])


def install_blocks(model: nn.Module, state: TokenState, drops: list[int], adapt: list[bool]) -> None:
    """Switch the model's blocks to :class:`ReducibleBlock` sharing ``state``: ``drops[i]`` tokens removed in
    block i, or an adaptive selection where ``adapt[i]``."""
    for i, (blk, r, a) in enumerate(zip(model.blocks, drops, adapt)):
        blk.__class__ = ReducibleBlock
        blk._vc_state, blk._vc_drop, blk._vc_adapt, blk._vc_first, blk._vc_index = state, int(r), bool(a), i == 0, i
    setattr(model, STATE_ATTR, state)
    if model.global_pool == "avg":
        model.pool = types.MethodType(_weighted_pool, model)
    elif getattr(model, "attn_pool", None) is not None:
        model.pool = types.MethodType(_size_aware_attn_pool, model)

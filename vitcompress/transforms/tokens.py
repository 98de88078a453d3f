"""Token bookkeeping that the token families share (token merging and pruning, adaptive tokens, sparse attention,
reports): tokens per layer, analytic FLOPs, and the per-forward token state a family installs on a model.

Shapes and counts: ``counts`` is one ``(tokens into attention, tokens into the MLP)`` pair per block, ints or per-image
tensors [B]; a ``schedule`` is the tokens each block removes between its attention and its MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

STATE_ATTR = "_vc_token_state"  # where a token family keeps its per-forward state on the model


def token_state(model: nn.Module) -> Any | None:
    """The token family's state installed on ``model`` (its ``adaptive`` says whether counts vary per image), or
    None for a model whose blocks keep every token."""
    return getattr(model, STATE_ATTR, None)


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


def model_dims(model: nn.Module) -> tuple[int, int, int, int]:
    """(tokens at the first block, protected prefix tokens, width, MLP hidden width)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    return n, model.num_prefix_tokens, model.embed_dim, model.blocks[0].mlp.fc1.out_features


def layer_widths(model: nn.Module) -> list[tuple[int, int]]:
    """(heads x head_dim, MLP hidden width) of each block: per layer, since head / MLP pruning changes them."""
    def out(m: nn.Module, default: int) -> int:  # deployed layers that do not say keep the model's widths
        return int(getattr(m, "out_features", default))

    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1
    return [(out(blk.attn.qkv, 3 * dim) // 3, out(blk.mlp.fc1, out(hidden, 4 * dim))) for blk in model.blocks]


def analytic_flops(model: nn.Module, counts: Sequence[tuple[Any, Any]]) -> Any:
    """FLOPs per image for (tokens into attention, into the MLP) per block, patch embedding and head included."""
    _, _, dim, _ = model_dims(model)
    proj = model.patch_embed.proj
    fixed = 2 * model.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * dim
    fixed += sum(2 * h.in_features * h.out_features for h in (model.head, getattr(model, "head_dist", None))
                 if isinstance(h, nn.Linear))
    return fixed + sum(block_flops(a, m, dim, h, ad) for (a, m), (ad, h) in zip(counts, layer_widths(model)))


def counts_flops_fraction(model: nn.Module, counts: Sequence[tuple[Any, Any]]) -> Any:
    """:func:`flops_fraction` for given (tokens into attention, into the MLP) per block: ints, or tensors [B]
    of per-image counts (adaptive methods) for a per-image fraction [B]."""
    n = model_dims(model)[0]
    return analytic_flops(model, counts) / analytic_flops(model, [(n, n)] * len(model.blocks))


def flops_fraction(model: nn.Module, schedule: list[int]) -> float:
    """Analytic GFLOPs under ``schedule`` over the unreduced model's (attention, patch embedding and head
    included), matching what ``torch.utils.flop_counter`` counts."""
    return float(counts_flops_fraction(model, token_counts(model_dims(model)[0], schedule)))


def tokens_per_layer(model: nn.Module) -> list[int] | None:
    """Tokens entering each block for the installed schedule (None without one, or for adaptive counts)."""
    st = token_state(model)
    if st is None or st.adaptive:
        return None
    n, _, _, _ = model_dims(model)
    return [a for a, _ in token_counts(n, [b._vc_drop for b in model.blocks])]

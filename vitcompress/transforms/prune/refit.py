"""Recovery without training after structured pruning: each block's output projections (``attn.proj``, ``mlp.fc2``)
refit by least squares so that the pruned residual stream follows the uncompressed one.

This is the layer-wise reconstruction of Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for
Transformers"), which tunes one scale per kept head / neuron; here the whole projection (weight and bias) is free,
which also compensates the removed structures' mean output as FLAP's bias compensation does. Block by block over
the calibration images, with ``X_d`` the dense stream and ``X_p`` the pruned one ([tokens, C]):

- attention: ``A`` = the kept heads' outputs at the pruned input (the input of the pruned ``attn.proj``,
  [tokens, H'*d]) and ``T = (X_d + ls1(attn_d(norm1(X_d))) - X_p) / gamma1``: the update that would put the pruned
  stream back on the dense one after this sub-layer (it absorbs what earlier blocks left too);
- MLP: the same with the kept hidden channels (the input of the pruned ``fc2``) and ``gamma2``;
- ``[W | b] = argmin ||[A, 1] [W | b]^T - T||^2 + lambda ||W||^2``, solved from the Gram matrices in float64, with
  ``lambda = damp * mean(diag(A^T A))`` (GPTQ's dampening) so that a rank-deficient ``A`` stays solvable.

The pruned model's other weights do not change; its structure is the pruned one, so artifacts reload as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..layers import calib_batches, layer_scale, token_stream

DAMP = 0.01
HEAD_DAMP = 0.1  # the head's fit has one row per image (not per token): a stronger pull toward the old head
CHUNK = 16  # images a sub-layer runs at once (the streams of every calibration image stay in memory)


def _gain(blk: nn.Module, name: str) -> torch.Tensor | None:
    """LayerScale's gamma [C] in float64, kept away from 0. Each output channel is its own least-squares problem,
    so fitting ``T / gamma`` has the same solution as fitting ``T`` through ``gamma`` (its weight gamma_c^2 is
    common to the whole channel)."""
    g = layer_scale(blk, name)
    if g is None:
        return None
    g = g.double()
    return torch.where(g >= 0, g.clamp_min(1e-12), g.clamp_max(-1e-12))


def check_refittable(model: nn.Module) -> None:
    """Refuse a model whose blocks are not pre-norm timm Blocks (what :func:`_branch` computes)."""
    parts = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
    for i, blk in enumerate(model.blocks):
        if not all(hasattr(blk, n) for n in parts) or hasattr(blk, "norm3"):
            raise ConfigError(f"refit: block {i} ({type(blk).__name__}) is not a pre-norm timm Block "
                              "(norm1 -> attn -> ls1, norm2 -> mlp -> ls2)")


class _Normal:
    """Running Gram matrices of ``[A, 1]`` ([k+1, k+1]) and ``[A, 1]^T T`` ([k+1, C]) in float64."""

    def __init__(self) -> None:
        self.ata: torch.Tensor | None = None
        self.att: torch.Tensor | None = None

    def add(self, a: torch.Tensor, t: torch.Tensor) -> None:
        a1 = torch.cat([a.reshape(-1, a.shape[-1]).double(), a.new_ones(a.shape[:-1].numel(), 1).double()], 1)
        t = t.reshape(-1, t.shape[-1]).double()
        ata, att = a1.T @ a1, a1.T @ t
        self.ata = ata if self.ata is None else self.ata + ata
        self.att = att if self.att is None else self.att + att

    def solve(self, layer: nn.Linear, damp: float = DAMP, prior: bool = False) -> None:
        """Write the solution into ``layer`` (out = C): its weight [C, k] and its bias [C] (if it has one; without one
        the fit has no constant column, so the artifact's structure stays the same). prior: the ridge term pulls
        the weight toward the layer's current one (``lambda ||W - W0||^2``) instead of toward 0: with fewer rows
        than columns, the directions the data does not see keep their old weights."""
        assert self.ata is not None and self.att is not None
        k = self.ata.shape[0] - 1
        n = k + 1 if layer.bias is not None else k
        ata, att = self.ata[:n, :n].clone(), self.att[:n].clone()
        lam = damp * ata.diagonal()[:k].mean().clamp_min(1e-12)
        ata.diagonal()[:k] += lam
        if prior:
            att[:k] += lam * layer.weight.detach().double().T
        sol = torch.linalg.solve(ata, att)  # [n, C]
        with torch.no_grad():
            layer.weight.copy_(sol[:k].T.to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(sol[k].to(layer.bias.dtype))


def _branch(blk: nn.Module, names: tuple[str, str, str], x: torch.Tensor) -> torch.Tensor:
    """One residual branch of a pre-norm block, ``ls(sub(norm(x)))`` [B,N,C], as timm's Block computes it."""
    norm, sub, ls = (getattr(blk, n) for n in names)
    return ls(sub(norm(x)))


def check_head_refittable(model: nn.Module) -> None:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "forward_head"):
        raise ConfigError("refit_head: the model has no Linear classifier head (num_classes 0?) to refit")


@torch.no_grad()
def refit_(dense: nn.Module, pruned: nn.Module, calib: Iterable[Any], calib_size: int, head: bool = False,
           ) -> dict[str, Any]:
    """Refit ``pruned``'s ``attn.proj`` and ``mlp.fc2`` in every block, in place (see the module docstring); its
    blocks must pass :func:`check_refittable`.

    dense: the model before pruning (not modified). Returns the relative error of the last block's output after the
    final norm (||X_p - X_d|| / ||X_d||), before and after the refit, on the calibration images: read from the
    streams the refit computes anyway (the pruned model runs once more, for "before").
    """
    device = next(pruned.parameters()).device
    images = torch.cat([x for x, _ in calib_batches(calib, calib_size, device)])
    xd = [token_stream(dense, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]
    xp = [token_stream(pruned, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]
    unfitted = [pruned.forward_features(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]
    for bd, bp in zip(dense.blocks, pruned.blocks):
        for names, proj in ((("norm1", "attn", "ls1"), bp.attn.proj), (("norm2", "mlp", "ls2"), bp.mlp.fc2)):
            eq, gain, seen = _Normal(), _gain(bp, names[2]), []
            hook = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # noqa: B023 (removed below)
            try:
                for j, (d, p) in enumerate(zip(xd, xp)):
                    xd[j] = d + _branch(bd, names, d)
                    _branch(bp, names, p)
                    t = (xd[j] - p).double()
                    eq.add(seen.pop(), t / gain if gain is not None else t)
            finally:
                hook.remove()
            eq.solve(proj)
            xp = [p + _branch(bp, names, p) for p in xp]
    out_d = [dense.norm(d) for d in xd]  # forward_features: the blocks, then the final norm
    out_p = [pruned.norm(p) for p in xp]
    state = {"refit_images": len(images), "stream_error_before": round(_relative_error(unfitted, out_d), 4),
             "stream_error_after": round(_relative_error(out_p, out_d), 4)}
    if head:
        state.update(_refit_head(dense, pruned, out_d, out_p))
    return state


def _refit_head(dense: nn.Module, pruned: nn.Module, out_d: list[torch.Tensor], out_p: list[torch.Tensor],
                ) -> dict[str, Any]:
    """Refit the classifier so the pruned model's logits follow the dense model's: ``head`` [K, C] by least squares
    from the pruned pooled features ([images, C]) to the dense logits ([images, K]), pulled toward the current head
    (one row per image: few rows, so the prior and a stronger ridge, ``HEAD_DAMP``). No labels are used."""
    want = [dense.forward_head(d) for d in out_d]
    feats = [pruned.forward_head(p, pre_logits=True) for p in out_p]
    before = _relative_error([pruned.head(f) for f in feats], want)
    eq = _Normal()
    for f, t in zip(feats, want):
        eq.add(f, t)
    eq.solve(pruned.head, HEAD_DAMP, prior=True)
    return {"logit_error_before_head_refit": round(before, 4),
            "logit_error_after_head_refit": round(_relative_error([pruned.head(f) for f in feats], want), 4)}


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over chunks of [b,N,C]."""
    num = sum(float((g - w).double().pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return (num / max(den, 1e-30)) ** 0.5

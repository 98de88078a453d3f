"""MiniViT's weight distillation losses beyond the logits, as pure tensor functions, and the hooks that capture
what they compare (the last block's q, k, v and MLP hidden features) on any timm ViT, compressed or not.

- attention relations (MiniLM-v2 style, the reference's ``cal_relation_loss`` with one relation head): for every
  pair (i, j) of {q, k, v} [B,N,C], R_ij = X_i X_j^T / sqrt(C) [B,N,N]; the loss is the soft cross-entropy of the
  student's rows against the teacher's, averaged over the 9 pairs. Widths may differ (a pruned student).
- hidden-state relations (``cal_hidden_relation_loss``): the MLP hidden features [B,N,D], each token L2-normalised,
  R = H H^T [B,N,N]; the loss is the mean squared difference times N (the reference scales by the token count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Row-wise cross-entropy of softmax(teacher) against log_softmax(student), [..., N] -> scalar (mean of rows)."""
    return -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()


def attention_relation_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """student, teacher: (q, k, v), each [B,N,C] (C may differ between them) -> scalar."""
    loss = student[0].new_zeros(())
    for i in range(3):
        for j in range(3):
            rs = student[i] @ student[j].transpose(-1, -2) / student[i].shape[-1] ** 0.5
            rt = teacher[i] @ teacher[j].transpose(-1, -2) / teacher[i].shape[-1] ** 0.5
            loss = loss + soft_cross_entropy(rs, rt)
    return loss / 9


def hidden_relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student [B,N,Ds], teacher [B,N,Dt] MLP hidden features -> scalar."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return ((s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)) ** 2).mean() * student.shape[1]


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, every forward of ``model`` leaves its last block's ``qkv`` output [B,N,3C] and MLP hidden features
    [B,N,D] (after the activation) in the yielded dict. A module that several blocks share runs more than once per
    forward; the last call (the last block's) wins."""
    got: dict[str, torch.Tensor] = {}
    last = model.blocks[-1]

    def keep(name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            got[name] = out
        return hook

    handles = [last.attn.qkv.register_forward_hook(keep("qkv")), last.mlp.act.register_forward_hook(keep("hidden"))]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the pre-logits features [B,D], relative to the teacher's mean energy -> scalar
    (scale-free, so one weight suits any backbone)."""
    return (student - teacher).pow(2).sum(-1).mean() / teacher.pow(2).sum(-1).mean().clamp_min(1e-12)


@contextlib.contextmanager
def capture_features(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, every forward of ``model`` leaves the input of its classifier ``head`` (the pre-logits features
    [B,D]: pooled, normed) in the yielded dict under ``features``."""
    got: dict[str, torch.Tensor] = {}
    handle = model.get_classifier().register_forward_pre_hook(lambda _m, args: got.__setitem__("features", args[0]))
    try:
        yield got
    finally:
        handle.remove()


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The qkv layer's output [B,N,3C] -> (q, k, v), each [B,N,C]."""
    return tuple(qkv.chunk(3, dim=-1))

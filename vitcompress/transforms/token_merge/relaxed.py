"""Training LTMP's thresholds and DiffRate's rates as the papers do: every token kept, removed ones masked.

The forward pass is built from timm's own submodules (patch_embed, _pos_embed, norm_pre, each block's norm1 /
attn / ls1 / norm2 / mlp / ls2, norm, fc_norm, head): no timm forward is copied. Each block's attention weighs
its keys by the mask (``attention(key_weight=mask)``), the method's step (``learned_ops``) updates the mask
between the attention and the MLP, and the tokens entering each block's attention and MLP are the mask's sums,
so the GFLOPs (``counts_flops_fraction``) are a differentiable function of the learned numbers.

Loss (both papers): cross-entropy on the labels (label smoothing 0.1, the reference's training default)
+ ``flops_weight`` x (GFLOPs fraction - target)^2. The backbone is frozen; only the per-layer numbers train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..attention import attention
from ..layers import token_stream
from ..tokens import counts_flops_fraction
from . import learned_ops as lo
from . import ops

# (block index, x, size, mask, keys [B,N,Dh], score [B,N]) -> (x, size, mask)
Step = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def masked_forward(model: nn.Module, images: torch.Tensor, step: Step, layers: set[int], score: str,
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """images [B,3,H,W] -> (logits [B,K], per block (tokens into attention [B], into the MLP [B]) as mask sums).
    score: ``importance`` (LTMP) or ``cls`` (DiffRate), the attention statistic handed to ``step``."""
    x = token_stream(model, images)
    b, n, _ = x.shape
    size = x.new_ones(b, n, 1, dtype=torch.float32)
    mask = x.new_ones(b, n, dtype=torch.float32)
    counts = []
    for i, blk in enumerate(model.blocks):
        n_attn = mask.sum(1)
        h, keys, s = attention(blk.attn, blk.norm1(x), ops.size_bias(size, x.dtype), cls_row=score == "cls",
                               importance=score == "importance", key_weight=mask)
        x = x + blk.drop_path1(blk.ls1(h))
        if i in layers:
            x, size, mask = step(i, x, size, mask, keys, s)  # type: ignore[arg-type]
        counts.append((n_attn, mask.sum(1)))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    pool = model.global_pool
    if pool == "avg":  # the live patch tokens, weighted by size
        p = 0 if model.pool_include_prefix else model.num_prefix_tokens
        w = (size[..., 0] * mask)[:, p:, None].to(x.dtype)
        pooled = (x[:, p:] * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return model.head(model.head_drop(model.fc_norm(pooled))), counts
    if pool != "token":
        raise ConfigError(f"learned token reduction trains models with 'token' or 'avg' pooling, not '{pool}'")
    return model.forward_head(x), counts


def ltmp_step(params: torch.Tensor, pos: dict[int, int], tau: float, protected: int) -> Step:
    """LTMP: params [L,2] = (merge threshold, prune threshold) per learned layer."""
    def step(i: int, x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor,
             importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = params[pos[i]]
        x, size, mask, _ = lo.ltmp_reduce(x, size, mask, keys, importance, lo.threshold_gate(theta[0], tau),
                                          lo.threshold_gate(theta[1], tau), protected)
        return x, size, mask
    return step


class DiffRateCounts:
    """DiffRate's per-layer kept counts during training: logits [L,2,n_patch] (prune, merge candidates); the
    kept counts of the current forward (straight through) feed the FLOPs."""

    def __init__(self, logits: torch.Tensor, pos: dict[int, int], protected: int):
        self.logits, self.pos, self.protected = logits, pos, protected
        self.n_patch = logits.shape[-1]
        self.kept: dict[int, torch.Tensor] = {}

    def step(self, i: int, x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor,
             cls_attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.protected
        x, size, mask = lo.sort_by_attention(x, size, cls_attn, p, mask)  # type: ignore[misc]
        last = int(mask[0, p:].detach().sum())
        prune_kept, prune_prob = lo.kept_probability(self.logits[self.pos[i], 0], self.n_patch)
        if int(prune_kept) < last:
            mask = mask * lo.count_mask(prune_prob, int(prune_kept), last, p)
        mid = min(last, int(prune_kept))
        merge_kept, merge_prob = lo.kept_probability(self.logits[self.pos[i], 1], self.n_patch)
        if int(merge_kept) < mid:
            x, size, _ = lo.diffrate_merge(x, size, p + int(merge_kept), p + mid, p)
            mask = mask * lo.count_mask(merge_prob, int(merge_kept), mid, p)
        self.kept[i] = torch.stack([prune_kept, merge_kept])
        return x, size, mask

    def counts(self, depth: int, batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(into attention, into the MLP) per block as DiffRate counts them: min(n, prune, merge) straight
        through to both kept counts."""
        out, cur = [], torch.tensor(float(n))
        for i in range(depth):
            nxt = cur
            if i in self.kept:
                k = self.kept[i].cpu() + self.protected
                nxt = lo.ste_min(cur, k[0], k[1])
            out.append((cur.expand(batch), nxt.expand(batch)))
            cur = nxt
        return out


def train_relaxed(student: nn.Module, method: str, layers: list[int], loader: Any, steps: int, *, target: float,
                  flops_weight: float, lr: tuple[float, float], tau: float, device: torch.device,
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train LTMP's thresholds [L,2] or DiffRate's candidate logits [L,2,n_patch] on a frozen ``student``.
    lr: (merge, prune) learning rates. Returns (the learned tensor, a training record)."""
    pos = {layer: j for j, layer in enumerate(layers)}
    p = student.num_prefix_tokens
    n = student.patch_embed.num_patches + p
    n_patch = n - p
    if method == "ltmp":  # the reference's initial thresholds: merge 0.9, prune 0, clamped to [0, 1]
        params = torch.tensor([[0.9, 0.0]] * len(layers), device=device, requires_grad=True)
        step, score = ltmp_step(params, pos, tau, p), "importance"
        # the reference's plain SGD (momentum 0), one learning rate for the merge and one for the prune thresholds
        opt: torch.optim.Optimizer = torch.optim.SGD([{"params": [params], "lr": 1.0}], lr=1.0)
        scale = torch.tensor([lr[0], lr[1]], device=device)
    else:  # DiffRate: uniform candidate probabilities at the start (the expected count is about half)
        params = torch.zeros(len(layers), 2, n_patch, device=device, requires_grad=True)
        counter = DiffRateCounts(params, pos, p)
        step, score = counter.step, "cls"
        opt = torch.optim.AdamW([params], lr=lr[0], weight_decay=0.0)
        scale = None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    start, seen, history = time.perf_counter(), 0, []
    for t, (x, y, _) in enumerate(loader):
        if t >= steps:
            break
        x, y = x.to(device), y.to(device)
        logits, counts = masked_forward(student, x, step, set(layers), score)
        if method != "ltmp":
            counts = counter.counts(len(student.blocks), len(x), n)
        frac = counts_flops_fraction(student, [(a.to(device), m.to(device)) for a, m in counts]).mean()
        ce = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss = ce + flops_weight * (frac - target) ** 2
        opt.zero_grad()
        loss.backward()
        if scale is not None and params.grad is not None:
            params.grad.mul_(scale)  # per-column learning rates under one SGD step
        opt.step()
        sched.step()
        if method == "ltmp":
            with torch.no_grad():
                params.clamp_(0.0, 1.0)
        seen += len(x)
        history.append((ce.item(), frac.item()))
    tail = history[-max(1, len(history) // 10):]
    record = {"seconds": round(time.perf_counter() - start, 1), "steps": len(history), "images": seen,
              "lr": list(lr), "temperature": tau, "flops_weight": flops_weight, "layers": layers,
              "final_ce": round(sum(k for k, _ in tail) / len(tail), 5),
              "train_flops_fraction": round(sum(f for _, f in tail) / len(tail), 4), "device": str(device)}
    return params.detach().cpu(), record


def diffrate_schedule(logits: torch.Tensor, layers: list[int], depth: int, n_patch: int,
                      ) -> tuple[list[int], list[int]]:
    """Learned logits [L,2,n_patch] -> per block (tokens pruned, tokens removed in all), decreasing counts."""
    pos = {layer: j for j, layer in enumerate(layers)}
    prune, drop, cur = [], [], n_patch
    for i in range(depth):
        if i not in pos:
            prune.append(0)
            drop.append(0)
            continue
        kp = min(cur, int(lo.kept_probability(logits[pos[i], 0], n_patch)[0]))
        km = min(kp, int(lo.kept_probability(logits[pos[i], 1], n_patch)[0]))
        prune.append(cur - kp)
        drop.append(cur - km)
        cur = km
    return prune, drop

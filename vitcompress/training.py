"""The training loop that ``vitcompress train`` and recovery fine-tuning share.

AdamW, linear warmup + cosine decay (per step), label smoothing, light batched augmentation (random flip and
affine on the preprocessed tensors), autocast in the configured dtype.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bench import Dtype
from .config import Config
from .errors import ConfigError, check_positive
from .ui import progress_bar, progress_on


@dataclasses.dataclass
class OptimConfig(Config):
    """The optimisation settings training and recovery fine-tuning share (AdamW, warmup + cosine, bf16)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    aug_rotate: float = 10.0
    aug_scale: float = 0.1
    aug_translate: float = 0.1
    aug_flip: float = 0.0
    dtype: Dtype = Dtype.AUTO
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        check_positive("batch size", self.batch_size)
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0, min_lr and weight_decay >= 0")
        if not 0 <= self.aug_flip <= 1:
            raise ConfigError(f"aug_flip is a probability in [0, 1], got {self.aug_flip}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def augment(x: torch.Tensor, cfg: OptimConfig, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, then rotation/scale/translation per image, batched. x: [B,C,H,W] -> [B,C,H,W]."""
    if cfg.aug_flip:
        flip = torch.rand(x.shape[0], generator=gen) < cfg.aug_flip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if not (cfg.aug_rotate or cfg.aug_scale or cfg.aug_translate):
        return x
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(cfg.aug_rotate)
    scale = 1 + u[:, 1] * cfg.aug_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * cfg.aug_translate], 1),
                         torch.stack([sin, cos, u[:, 3] * 2 * cfg.aug_translate], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def lr_at(step: int, total: int, warmup: int, cfg: OptimConfig) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def fit(model: nn.Module, loader: Any, loss_fn: Any, cfg: OptimConfig, device: torch.device, *,
        params: list[nn.Parameter] | None = None, progress: bool | None = False, desc: str = "train",
        ) -> tuple[float, float]:
    """Optimise ``loss_fn(x [B,3,H,W], y [B]) -> scalar`` over ``loader`` for ``cfg.epochs`` epochs.

    AdamW on ``params`` (default: all trainable; no weight decay on biases, norms and position embeddings),
    per-step linear warmup + cosine decay, batched augmentation, autocast. Returns (smoothed final loss, seconds).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in named if id(p) in ids]
    decay = [p for n, p in named if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps = cfg.epochs * len(loader)
    warmup = min(steps, int(cfg.warmup_epochs * len(loader)))
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = cfg.dtype.on(device)
    use_amp = dtype != Dtype.FP32
    t0, step, loss_avg = time.perf_counter(), 0, float("nan")
    progress = progress_on(progress)  # None: the process's default (the CLI shows progress)
    with progress_bar(progress, steps, desc) as tick:
        for epoch in range(cfg.epochs):
            for x, y, _ in loader:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, warmup, cfg)
                x = augment(x, cfg, gen).to(device)
                with torch.autocast(device.type, dtype=dtype.torch, enabled=use_amp):
                    loss = loss_fn(x, y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                step += 1
                tick(description=f"{desc} epoch {epoch + 1}/{cfg.epochs} loss {loss_avg:.3f}")
            if not progress:  # a log line per epoch for runs in the background (no progress bar there)
                print(f"{desc}: epoch {epoch + 1}/{cfg.epochs} loss {loss_avg:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return loss_avg, time.perf_counter() - t0

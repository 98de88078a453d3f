"""``vitcompress train``: train or fine-tune a ViT classifier and save it as an artifact.

AdamW, linear warmup + cosine decay (per step), label smoothing, light batched augmentation (random
affine on the preprocessed tensors), bf16 autocast. Offline there are no pretrained weights, so this is
how the digits testbed (``recipes/digits_vit.yaml``) is made.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bench import BenchConfig, Dtype
from .config import Config
from .errors import ConfigError, check_positive
from .ui import progress_bar


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
    dtype: Dtype = Dtype.BF16
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        check_positive("batch size", self.batch_size)
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0, min_lr and weight_decay >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass
class TrainConfig(OptimConfig):
    """Everything a training run depends on; a recipe YAML is this dict (``train:`` section)."""

    NAME = "train"
    VERSION = 1
    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    data: str = "digits"
    split: str | None = None
    eval_data: str | None = "digits"
    limit: int | None = None

    def validate(self) -> None:
        super().validate()
        check_positive("epochs", self.epochs)
        check_positive("limit", self.limit)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML into a dict (a mapping at the top level)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping")
    return data


def augment(x: torch.Tensor, cfg: OptimConfig, gen: torch.Generator) -> torch.Tensor:
    """Random rotation/scale/translation per image, batched. x: [B,C,H,W] -> [B,C,H,W]."""
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
        params: list[nn.Parameter] | None = None, progress: bool = False, desc: str = "train") -> tuple[float, float]:
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
    use_amp = cfg.dtype != Dtype.FP32
    t0, step, loss_avg = time.perf_counter(), 0, float("nan")
    with progress_bar(progress, steps, desc) as tick:
        for epoch in range(cfg.epochs):
            for x, y, _ in loader:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, warmup, cfg)
                x = augment(x, cfg, gen).to(device)
                with torch.autocast(device.type, dtype=cfg.dtype.torch, enabled=use_amp):
                    loss = loss_fn(x, y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                step += 1
                tick(description=f"{desc} epoch {epoch + 1}/{cfg.epochs} loss {loss_avg:.3f}")
    return loss_avg, time.perf_counter() - t0


def train(cfg: TrainConfig, out: str | Path | None = None, *, progress: bool = False,
          recipe: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train per ``cfg``; save an artifact at ``out`` when given. Returns (model, metrics)."""
    from .artifact import save_artifact
    from .data import load_data
    from .evaluate import accuracy_metrics, predict
    from .models import create_model, data_config

    torch.manual_seed(cfg.seed)
    device = BenchConfig(device=cfg.device).resolve_device()
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **cfg.model_kwargs)
    dcfg = data_config(model)
    data = load_data(cfg.data, dcfg, split=cfg.split, limit=cfg.limit, purpose="train")
    if not data.has_labels:
        raise ConfigError(f"cannot train on '{cfg.data}': it has no labels")
    n_classes = model.num_classes
    if data.num_classes and data.num_classes > n_classes:
        raise ConfigError(f"data has {data.num_classes} classes but the model has {n_classes} outputs "
                          "(set num_classes in model_kwargs)")
    model.to(device).train()
    loader = data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)

    loss_avg, train_s = fit(model, loader, loss_fn, cfg, device, progress=progress)
    steps = cfg.epochs * len(loader)
    model.eval()
    metrics: dict[str, Any] = {"train_seconds": round(train_s, 1), "final_loss": round(loss_avg, 4),
                               "epochs": cfg.epochs, "steps": steps, "device": str(device)}
    if cfg.eval_data:
        eval_data = load_data(cfg.eval_data, dcfg)
        logits, labels, _ = predict(model, eval_data, cfg=BenchConfig(device=cfg.device, dtype=cfg.dtype))
        acc = accuracy_metrics(logits, labels, None)
        metrics.update({"eval_data": f"{cfg.eval_data}:{eval_data.split}", "top1": acc["top1"], "top5": acc["top5"],
                        "eval_images": acc["n_images"]})
    if out is not None:
        prov = {"train": cfg.to_dict(), "data": data.describe()}
        if recipe is not None:
            prov["recipe"] = recipe
        save_artifact(model, out, metrics=metrics, provenance=prov)
    return model, metrics

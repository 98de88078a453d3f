"""Adversarial robustness of a (compressed) model: FGSM / PGD, white-box or transferred from the base.

The attacks are L-inf in pixel space ([0, 1] images, ``eps`` e.g. 2/255), applied before the model's
normalisation. Compressed models have non-differentiable parts, so the gradient comes from a *gradient twin*
(BPDA, Athalye et al. 2018): a float copy in which

- every layer with a ``gradient_twin()`` (each method family declares its own) becomes what that returns:
  deployable quantized layers (int8 / fp8 / weight-only) the function they compute where they run (the same
  weights, 7-bit ones too, and the same activation rounding), with the rounding's gradient passed straight
  through; simulated quantizers themselves, rounding in the forward pass with straight-through gradients (STE);
  block-sparse layers their dense path;
- token merging / pruning and sparse attention keep their discrete choices (which tokens merge, which tiles
  run) fixed and differentiate through the values, as their training does;
- kernels run their torch references.

The adversarial images are then scored on the real model. ``source: base`` crafts them on the uncompressed base
and transfers them; the *transfer rate* is the share of the base's successful adversarial examples (clean
correct, adversarial wrong on the base) that also fool the evaluated model.
"""

from __future__ import annotations

import copy
import dataclasses
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bench import BenchConfig, Dtype
from .config import Config, StrEnum
from .data import ImageData
from .errors import ConfigError
from .models import data_config
from .transforms.layers import use_torch_references_


class AttackMethod(StrEnum):
    FGSM = "fgsm"
    PGD = "pgd"


class AttackSource(StrEnum):
    SELF = "self"  # white-box on the evaluated model (through its gradient twin)
    BASE = "base"  # crafted on the uncompressed base, transferred


GRADIENT_NOTE = ("BPDA gradient twin: deployed int8/fp8/weight-only layers as the function they compute (their weights "
                 "and activation rounding, straight-through), straight-through rounding for simulated quantizers, "
                 "token merging and sparse attention with their choices fixed")


def parse_eps(value: str | float) -> float:
    """``2/255``, ``0.01`` or a number -> float; a ConfigError otherwise."""
    try:
        return float(Fraction(str(value)))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"eps must be a number or a fraction like 2/255, got '{value}'") from None


@dataclasses.dataclass
class AttackConfig(Config):
    """method: fgsm (one step of eps) or pgd (``steps`` steps of ``step_size``, default 2.5 eps / steps, from a
    seeded random start); eps: L-inf radius in [0, 1] pixels; source: self (white-box) or base (transfer)."""

    NAME = "attack"
    VERSION = 1
    method: AttackMethod = AttackMethod.PGD
    eps: float | str = 2 / 255  # a str such as "2/255" is parsed by validate
    steps: int = 10
    step_size: float | None = None
    source: AttackSource = AttackSource.SELF
    random_start: bool = True
    seed: int = 0

    def validate(self) -> None:
        self.eps = parse_eps(self.eps)
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps is in [0, 1] pixel units (e.g. 2/255), got {self.eps}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size}")


def gradient_twin(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` that autograd can differentiate (see the module docstring)."""
    twin = copy.deepcopy(model).float().eval()
    for name, mod in list(twin.named_modules()):
        if hasattr(mod, "gradient_twin"):  # each family's layer gives its own: its weights, its activation rounding
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, mod.gradient_twin())
    use_torch_references_(twin)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _norm(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = data_config(model)
    return (torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1),
            torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1))


def craft(twin: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """Adversarial versions of normalised images x [B,3,H,W] with labels y [B], crafted on ``twin`` (float32,
    on x's device); returns normalised images [B,3,H,W] within ``eps`` of x in pixel space."""
    mean, std = _norm(twin, x.device)
    pix = (x.float() * std + mean).clamp(0, 1)
    if cfg.eps == 0:
        return x.clone()
    steps = 1 if cfg.method == AttackMethod.FGSM else cfg.steps
    alpha = cfg.eps if cfg.method == AttackMethod.FGSM else (cfg.step_size or 2.5 * cfg.eps / cfg.steps)
    delta = torch.zeros_like(pix)
    if cfg.method == AttackMethod.PGD and cfg.random_start:
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        delta = (torch.rand(pix.shape, generator=g) * 2 - 1).to(pix.device) * cfg.eps
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(twin(((pix + delta).clamp(0, 1) - mean) / std), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-cfg.eps, cfg.eps)
    return ((pix + delta).clamp(0, 1) - mean) / std


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, bench: BenchConfig, device: torch.device) -> torch.Tensor:
    dtype = bench.dtype.on(device)
    with torch.autocast(device.type, dtype=dtype.torch, enabled=dtype != Dtype.FP32):
        return model(x.to(device)).float().cpu()


def attack_eval(model: nn.Module, data: ImageData, cfg: AttackConfig, *, base: nn.Module | None = None,
                batch_size: int = 64, bench: BenchConfig | None = None) -> dict[str, Any]:
    """Robust top-1 of ``model`` on ``data`` under ``cfg``; with ``source: base`` also the transfer rate.

    Returns clean_top1, robust_top1 (percent), attack_success (percent of clean-correct images flipped) and,
    for base-crafted attacks, base_robust_top1, base_successes and transfer_rate (percent)."""
    if not data.has_labels:
        raise ConfigError(f"the attack needs labels; {data.name} has none")
    bench = bench or BenchConfig()
    device = bench.resolve_device()
    model = model.to(device).eval()
    if cfg.source == AttackSource.BASE and base is None:
        raise ConfigError("--attack-source base needs the model's uncompressed base (its artifact is gone)")
    source = base if cfg.source == AttackSource.BASE else model
    if not isinstance(source, nn.Module) or not any(True for _ in source.parameters()):
        raise ConfigError("a white-box attack needs a torch model: use --attack-source base for an exported file")
    twin = gradient_twin(source).to(device)
    clean, adv, base_clean, base_adv, labels = [], [], [], [], []
    for x, y, _ in data.loader(batch_size):
        x, y = x.to(device), y.to(device)
        x_adv = craft(twin, x, y, cfg)
        clean.append(_logits(model, x, bench, device).argmax(1))
        adv.append(_logits(model, x_adv, bench, device).argmax(1))
        if cfg.source == AttackSource.BASE:
            base_clean.append(_logits(base, x, bench, device).argmax(1))
            base_adv.append(_logits(base, x_adv, bench, device).argmax(1))
        labels.append(y.cpu())
    y = torch.cat(labels)
    ok, ok_adv = torch.cat(clean) == y, torch.cat(adv) == y
    out: dict[str, Any] = {**cfg.to_dict(), "gradient": GRADIENT_NOTE, "images": len(y),
                           "clean_top1": 100.0 * ok.float().mean().item(),
                           "robust_top1": 100.0 * ok_adv.float().mean().item(),
                           "attack_success": 100.0 * (ok & ~ok_adv).sum().item() / max(int(ok.sum()), 1)}
    if cfg.source == AttackSource.BASE:
        b_ok, b_adv = torch.cat(base_clean) == y, torch.cat(base_adv) == y
        fooled = b_ok & ~b_adv  # the base's successful adversarial examples
        out.update(base_robust_top1=100.0 * b_adv.float().mean().item(), base_successes=int(fooled.sum()),
                   transfer_rate=None if not fooled.any() else 100.0 * (fooled & ~ok_adv).sum().item()
                   / int(fooled.sum()))
    return out


__all__ = ["AttackConfig", "AttackMethod", "AttackSource", "attack_eval", "craft", "gradient_twin", "parse_eps"]

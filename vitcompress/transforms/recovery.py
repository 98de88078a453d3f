"""Recovery fine-tuning after compression (a registered transform): distillation from the uncompressed model.

Loss (``distill``):

- ``none``: cross-entropy on the labels;
- ``soft``: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``;
- ``hard``: DeiT's hard distillation, ``0.5 * CE(s, labels) + 0.5 * CE(s, argmax t)``;
- ``weight``: MiniViT's weight distillation: ``soft`` plus ``attn_weight`` x the last block's q/k/v relation loss
  plus ``hidden_weight`` x its MLP hidden-state relation loss (:mod:`.distill`);
- ``features``: ``alpha * ||f_s - f_t||^2 / ||f_t||^2 + (1 - alpha) * CE(s, labels)`` on the pre-logits features
  (the classifier's input): a backbone with a linear probe gets the whole feature to match, not 10 logits.

``attn_only`` trains only the attention weights (qkv, proj and their norms); everything else is frozen,
which saves optimizer state and weight gradients ("Three things everyone should know about ViTs").
The artifact records ``provenance.recovery`` with its level: ``none`` (0 epochs), ``short`` (<= 10 epochs)
or ``full`` (more), which reports print next to each point.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import StrEnum
from ..data import load_data
from ..device import resolve_device
from ..errors import ConfigError
from ..models import data_config, model_info
from ..training import OptimConfig, fit
from . import distill
from .layers import simulated_quantization
from .registry import TransformContext, register_transform

SHORT_MAX_EPOCHS = 10


class Distill(StrEnum):
    NONE = "none"
    SOFT = "soft"
    HARD = "hard"
    WEIGHT = "weight"
    FEATURES = "features"


@dataclasses.dataclass
class RecoveryConfig(OptimConfig):
    """Fine-tuning after compression. data: a dataset spec whose *train* split is used."""

    NAME = "recovery"

    FAMILY = "recovery"
    VERSION = 2  # 2: distill weight, attn_weight, hidden_weight (v1 dicts read as they were)
    data: str = "digits"
    limit: int | None = None
    epochs: int = 5
    lr: float = 5e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    distill: Distill = Distill.SOFT
    temperature: float = 1.0
    alpha: float = 0.7
    attn_only: bool = False
    attn_weight: float = 1.0
    hidden_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.attn_weight < 0 or self.hidden_weight < 0:
            raise ConfigError(f"attn_weight and hidden_weight must be >= 0 (got {self.attn_weight}, "
                              f"{self.hidden_weight})")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(f"temperature must be > 0 and alpha in [0, 1] (got {self.temperature}, {self.alpha})")

    @property
    def needs_teacher(self) -> bool:
        return self.epochs > 0 and self.distill != Distill.NONE

    @property
    def level(self) -> str:
        return "none" if self.epochs == 0 else "short" if self.epochs <= SHORT_MAX_EPOCHS else "full"


def attention_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every block's attention module."""
    return [p for n, p in model.named_parameters() if ".attn." in n]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                 cfg: RecoveryConfig, student_dist: torch.Tensor | None = None) -> torch.Tensor:
    """The recovery loss from student logits [B,K], teacher logits [B,K] (or None) and labels [B].

    student_dist: a distilled model's distillation-head logits [B,K]. With ``hard`` distillation they learn the
    teacher's hard labels while the class head learns the true labels, as in DeiT.
    """
    ce = F.cross_entropy(student, labels, label_smoothing=cfg.label_smoothing)
    if cfg.distill == Distill.NONE or teacher is None:
        return ce if student_dist is None else 0.5 * ce + 0.5 * F.cross_entropy(student_dist, labels)
    if cfg.distill == Distill.HARD:
        return 0.5 * ce + 0.5 * F.cross_entropy(student if student_dist is None else student_dist, teacher.argmax(-1))
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    return cfg.alpha * kl + (1 - cfg.alpha) * ce


def finetune_(model: nn.Module, cfg: RecoveryConfig, *, teacher: nn.Module | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place per ``cfg``; record ``provenance.recovery``. Returns its metrics.

    teacher: the uncompressed model; needed unless ``distill`` is none (:func:`vitcompress.pipeline.apply_stack`
    passes the model as it was before the stack).
    """
    info = model_info(model)
    record: dict[str, Any] = {"level": cfg.level, "config": cfg.to_dict()}
    if cfg.epochs > 0 and simulated_quantization(model):
        raise ConfigError("fine-tuning a simulated-quantized model would move its weights off their grid "
                          "(torch.round passes no gradient): put recovery before quantize in the stack")
    if cfg.epochs == 0:
        info.provenance["recovery"] = record
        return record
    if cfg.needs_teacher and teacher is None:
        raise ConfigError("distillation needs the uncompressed model as a teacher (or distill: none)")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, data_config(model), limit=cfg.limit, purpose="train")
    if not data.has_labels:
        raise ConfigError(f"cannot fine-tune on '{cfg.data}': it has no labels")
    if teacher is not None:  # the caller's teacher is left as it is (its forward runs under no_grad)
        teacher = teacher.to(device).eval()
    trainable = attention_params(model) if cfg.attn_only else [p for p in model.parameters() if p.requires_grad]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)

    weight = cfg.distill == Distill.WEIGHT and teacher is not None
    features = cfg.distill == Distill.FEATURES and teacher is not None

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = None
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x).float()
        out = model(x)  # a distilled model in distilled training returns (class logits, distillation logits)
        if isinstance(out, tuple):
            return distill_loss(out[0].float(), t, y, cfg, student_dist=out[1].float())
        if features:
            return cfg.alpha * distill.feature_loss(s_feats["features"].float(), t_feats["features"].float()) \
                + (1 - cfg.alpha) * F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
        loss = distill_loss(out.float(), t, y, cfg)
        if weight:  # MiniViT: the last block's relations as well
            loss = loss + cfg.attn_weight * distill.attention_relation_loss(
                distill.split_qkv(s_feats["qkv"].float()), distill.split_qkv(t_feats["qkv"].float()))
            loss = loss + cfg.hidden_weight * distill.hidden_relation_loss(s_feats["hidden"].float(),
                                                                           t_feats["hidden"].float())
        return loss

    two_heads = cfg.distill == Distill.HARD and hasattr(model, "set_distilled_training")
    if two_heads:  # DeiT: each head gets its own target (see distill_loss)
        model.set_distilled_training(True)
    model.to(device).train()
    captures = contextlib.ExitStack()  # MiniViT: hooks keep the last block's features; removed in the finally below
    hooks = distill.capture if weight else distill.capture_features if features else None
    s_feats = captures.enter_context(hooks(model)) if hooks else {}
    t_feats = captures.enter_context(hooks(teacher)) if hooks else {}  # type: ignore[arg-type]
    try:
        loss, seconds = fit(model, data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed), loss_fn, cfg, device,
                            params=trainable, progress=progress, desc="recover")
    finally:
        captures.close()
        if two_heads:
            model.set_distilled_training(False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    record.update({"seconds": round(seconds, 1), "final_loss": round(loss, 4), "data": data.describe(),
                   "trainable_params": sum(p.numel() for p in trainable), "device": str(device)})
    info.provenance["recovery"] = record
    return record


def _rebuild(model: nn.Module, cfg: RecoveryConfig, state: dict[str, Any]) -> None:
    """Nothing: fine-tuning changes weights only, and the artifact's weights are loaded afterwards."""


@register_transform(RecoveryConfig, rebuild=_rebuild)
def _recover(model: nn.Module, cfg: RecoveryConfig, ctx: TransformContext) -> dict[str, Any]:
    """Fine-tune in place."""
    record = finetune_(model, cfg, teacher=ctx.teacher)
    return {k: v for k, v in record.items() if k != "config"}


def unpruned_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to distil from after it is compressed in place."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

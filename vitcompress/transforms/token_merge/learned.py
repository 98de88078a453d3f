"""Learned token merging under a FLOPs budget, with the backbone frozen: the config, the training, the transform.

Both methods learn one number per layer through a relaxation of ToMe's bipartite merge
(``ops.bipartite_edges`` + ``ops.weighted_merge``) and a loss of KL(teacher || student) + ``flops_weight`` x
(mean GFLOPs fraction - target)^2, where the GFLOPs follow the expected token counts:

- ``ltmp`` (LTMP, Bonnaerens & Dambre 2023): a similarity threshold per layer; inference merges every pair
  above it, so the counts differ per image (a padded batch, as the adaptive methods). LTMP trains with the
  soft weight sigmoid((similarity - threshold) / temperature) in the forward pass; here the forward pass merges
  exactly as inference will and that sigmoid only carries the gradient (straight through), because the soft
  forward overstated the savings: on the CIFAR-10 testbed it trained to 0.53x GFLOPs and ran at 0.89x.
- ``diffrate`` (DiffRate-style, Chen et al. 2023): a merge count per layer. The forward pass merges the
  round(r) most similar pairs exactly (ToMe), the backward pass differentiates sigmoid((r - rank - 0.5) /
  temperature) (straight through). The solved counts become a fixed ToMe schedule, recorded as ToMe's is.

Training reads at most one epoch of the ``data`` train split (``epochs`` <= 1), and only the per-layer numbers
change; the time it took is recorded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config, StrEnum
from ...data import load_data
from ...device import resolve_device
from ...errors import ConfigError
from ...models import data_config, model_info
from ..registry import TransformContext, register_transform
from .adaptive import trace_summary
from .block import MergeWeights, TokenState, install_blocks
from .transform import TokenMergeConfig, capped, counts_flops_fraction
from .transform import install as install_tome


class LearnedMethod(StrEnum):
    LTMP = "ltmp"  # per-layer similarity thresholds -> per-image counts
    DIFFRATE = "diffrate"  # per-layer merge counts -> a fixed ToMe schedule


@dataclasses.dataclass
class LearnedMergeConfig(Config):
    """target_flops: the budget, a fraction of the base GFLOPs (mean per image for ltmp); data: the training
    images (their train split), at most ``limit``, for ``epochs`` (<= 1) of them; layers: where tokens merge
    (default every block; [] = off); lr / temperature: per method (None: ltmp 0.01 / 0.05, diffrate 0.5 / 1.0)."""

    NAME = "learned_merge"

    FAMILY = "token"
    VERSION = 1
    method: LearnedMethod = LearnedMethod.LTMP
    target_flops: float = 0.65
    data: str = "digits"
    limit: int | None = None
    epochs: float = 1.0
    batch_size: int = 64
    lr: float | None = None
    temperature: float | None = None
    flops_weight: float = 50.0
    layers: list[int] | None = None
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.target_flops <= 1:
            raise ConfigError(f"target_flops is a fraction of the base GFLOPs in (0, 1], got {self.target_flops}")
        if not 0 < self.epochs <= 1:
            raise ConfigError(f"epochs must be in (0, 1] (learned merging trains for at most one epoch), "
                              f"got {self.epochs}")
        for name in ("batch_size", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def hyper(self) -> tuple[float, float]:
        """(lr, temperature) with the method's defaults."""
        lr, temp = (0.01, 0.05) if self.method == LearnedMethod.LTMP else (0.5, 1.0)
        return self.lr or lr, self.temperature or temp


def merge_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    depth = len(model.blocks)
    layers = list(range(depth)) if layers is None else list(layers)
    if any(not 0 <= i < depth for i in layers):
        raise ConfigError(f"layers must be in [0, {depth - 1}], got {layers}")
    return layers


def threshold_weights(thresholds: dict[int, float] | None = None, params: torch.Tensor | None = None,
                      pos: dict[int, int] | None = None, temperature: float = 0.05) -> MergeWeights:
    """LTMP's weights: ``similarity > threshold``; with ``params`` (training) its sigmoid carries the gradient."""
    if params is None:
        assert thresholds is not None
        return lambda i, sim, rank: (sim > thresholds[i]).float()
    assert pos is not None

    def weights(i: int, sim: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        theta = params[pos[i]]
        soft = torch.sigmoid((sim - theta) / temperature).nan_to_num(0.0)
        return (sim > theta).float() + (soft - soft.detach())  # exactly the hard value: x - x == 0
    return weights


def rate_weights(params: torch.Tensor, pos: dict[int, int], temperature: float) -> MergeWeights:
    """DiffRate's weights: merge the round(r) most similar pairs (forward), sigmoid in rank (backward)."""
    def weights(i: int, sim: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        r = params[pos[i]]
        ok = torch.isfinite(sim)
        soft = torch.sigmoid((r - rank.float() - 0.5) / temperature) * ok
        hard = ((rank.float() < torch.round(r)) & ok).float()
        return hard + (soft - soft.detach())
    return weights


def _counts(trace: list[tuple[Any, Any]], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.as_tensor(a, dtype=torch.float32).expand(batch), torch.as_tensor(m, dtype=torch.float32)
             .expand(batch)) for a, m in trace]


def train_merge(model: nn.Module, cfg: LearnedMergeConfig) -> tuple[list[float], dict[str, Any]]:
    """Learn the per-layer numbers on a frozen copy of ``model`` (``model`` is the teacher and stays as it is).
    Returns (one number per layer of ``cfg.layers``, a training record)."""
    layers = merge_layers(model, cfg.layers)
    pos = {layer: j for j, layer in enumerate(layers)}
    lr, temp = cfg.hyper
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    teacher = model.to(device).eval()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    ltmp = cfg.method == LearnedMethod.LTMP
    params = nn.Parameter(torch.full((len(layers),), 1.0 + 2 * temp if ltmp else 0.0, device=device))
    weights = threshold_weights(params=params, pos=pos, temperature=temp) if ltmp else rate_weights(params, pos, temp)
    state = TokenState(protected=student.num_prefix_tokens, prop_attn=True, method=None, backend="torch",
                       merge_weights=weights, soft=True)
    depth = len(student.blocks)
    install_blocks(student, state, [0] * depth, [i in pos for i in range(depth)])
    data = load_data(cfg.data, data_config(model), limit=cfg.limit, purpose="train")
    loader = data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps = max(1, math.ceil(cfg.epochs * len(loader)))
    opt = torch.optim.Adam([params], lr=lr)
    start, seen, history = time.perf_counter(), 0, []
    for step, (x, _, _) in enumerate(loader):
        if step >= steps:
            break
        x = x.to(device)
        with torch.no_grad():
            t = teacher(x).float()
        state.trace = []
        s = student(x).float()
        frac = counts_flops_fraction(student, _counts(state.trace, len(x))).mean()
        state.trace = None
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        loss = kl + cfg.flops_weight * (frac - cfg.target_flops) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not ltmp:
            with torch.no_grad():
                params.clamp_(min=0.0)
        seen += len(x)
        history.append((kl.item(), frac.item()))
    tail = history[-max(1, len(history) // 10):]
    record = {"seconds": round(time.perf_counter() - start, 1), "steps": len(history), "images": seen,
              "data": data.describe(), "lr": lr, "temperature": temp, "layers": layers,
              "final_kl": round(sum(k for k, _ in tail) / len(tail), 5),
              "train_flops_fraction": round(sum(f for _, f in tail) / len(tail), 4), "device": str(device)}
    return [float(v) for v in params.detach().cpu()], record


def install_ltmp(model: nn.Module, layers: list[int], thresholds: list[float]) -> None:
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply one token reduction method")
    by_layer = dict(zip(layers, thresholds))
    state = TokenState(protected=model.num_prefix_tokens, prop_attn=True, method=None,
                       merge_weights=threshold_weights(by_layer), summarize=trace_summary)
    depth = len(model.blocks)
    install_blocks(model, state, [0] * depth, [i in by_layer for i in range(depth)])


def diffrate_schedule(model: nn.Module, layers: list[int], rates: list[float]) -> list[int]:
    by_layer = dict(zip(layers, rates))
    return capped(model, [max(0, round(by_layer.get(i, 0.0))) for i in range(len(model.blocks))])


def _install(model: nn.Module, cfg: LearnedMergeConfig, state: dict[str, Any]) -> None:
    """The learned thresholds (LTMP) or merge schedule (DiffRate-style) of ``state``; nothing without layers."""
    if not state.get("layers"):
        return
    if cfg.method == LearnedMethod.LTMP:
        install_ltmp(model, state["layers"], state["values"])
    else:
        install_tome(model, state["schedule"], TokenMergeConfig(schedule=state["schedule"]))


@register_transform(LearnedMergeConfig, rebuild=_install)
def learned_merge_(model: nn.Module, cfg: LearnedMergeConfig, ctx: TransformContext) -> dict[str, Any]:
    """Learn the per-layer thresholds / rates and install them in place."""
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply one token reduction method")
    if not merge_layers(model, cfg.layers):  # nowhere to merge: strength zero, the model is left as it is
        return {"layers": []}
    values, record = train_merge(model, cfg)
    model_info(model).provenance["learned_merge"] = record  # reports show the training beside the point
    layers = merge_layers(model, cfg.layers)
    out = {"layers": layers, "values": values, "training": record}
    if cfg.method == LearnedMethod.DIFFRATE:
        out["schedule"] = diffrate_schedule(model, layers, values)
    _install(model, cfg, out)
    return out


__all__ = ["LearnedMergeConfig", "LearnedMethod", "learned_merge_"]

"""Learned token reduction under a FLOPs budget, with the backbone frozen: the config, the training, the transform.

As their papers and reference code define them (``relaxed.py`` trains them, ``learned_ops.py`` is the algorithm):

- ``ltmp`` (LTMP, Bonnaerens & Dambre 2023): a merge and a prune threshold per layer. Sources merge into their
  most similar destination where the similarity is above the merge threshold, then tokens whose importance
  (the attention they receive) is below the prune threshold leave; counts differ per image (a padded batch, as
  the adaptive methods).
- ``diffrate`` (DiffRate, Chen et al. 2023): a prune and a merge count per layer, each a softmax over the
  candidate counts; tokens are sorted by CLS attention, the tail is pruned, the unimportant rest merges into
  the important ones. The counts are fixed per layer (a static schedule: compiles and exports).

Both train with a mask in place of removal and cross-entropy + ``flops_weight`` x (GFLOPs fraction - target)^2.
Kept beside them, our earlier variants (KL to the teacher; a straight-through relaxation of ToMe's merge, with
tokens removed in the forward pass):

- ``ltm`` ("LTMP (merge only)"): the merge threshold alone; the sigmoid of (similarity - threshold) / temperature
  carries the gradient.
- ``diffrate_merge`` ("DiffRate (merge only)"): a merge count per layer with ToMe's alternate split; the
  backward pass differentiates sigmoid((r - rank - 0.5) / temperature); the counts become a ToMe schedule.

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
from ..tokens import counts_flops_fraction
from .adaptive import trace_summary
from .block import MergeWeights, TokenMethod, TokenState, install_blocks
from .learned_ops import ltmp_reduce, threshold_gate
from .relaxed import diffrate_schedule, train_relaxed
from .transform import TokenMergeConfig, capped
from .transform import install as install_tome


class LearnedMethod(StrEnum):
    LTMP = "ltmp"  # per-layer merge and prune thresholds -> per-image counts
    DIFFRATE = "diffrate"  # per-layer prune and merge counts -> a fixed schedule
    LTM = "ltm"  # our earlier variant: merge thresholds only, KL to the teacher
    DIFFRATE_MERGE = "diffrate_merge"  # our earlier variant: merge counts only (ToMe's split), KL

    @property
    def faithful(self) -> bool:
        """Trained as the paper does (masked tokens, cross-entropy on labels)."""
        return self in (LearnedMethod.LTMP, LearnedMethod.DIFFRATE)


@dataclasses.dataclass
class LearnedMergeConfig(Config):
    """target_flops: the budget, a fraction of the base GFLOPs (mean per image for ltmp / ltm); data: the training
    images (their train split, with labels for ltmp / diffrate), at most ``limit``, for ``epochs`` (<= 1) of them;
    layers: where tokens are reduced (default every block, DiffRate's from the second; [] = off).
    lr / temperature / flops_weight: None takes the method's default: ltmp the reference's SGD learning rates
    (0.005 for the merge thresholds; ``lr`` scales both, the prune one stays 1/1000 of it), tau 0.1 and weight
    10; diffrate AdamW at 0.01 and weight 100 (the reference's 5 per GFLOP^2 on DeiT-S's 4.6 GFLOPs, as a
    fraction); ltm 0.01 / 0.05 / 50; diffrate_merge 0.5 / 1.0 / 50."""

    NAME = "learned_merge"

    FAMILY = "token"
    VERSION = 2  # 2: ltmp / diffrate are the papers' methods; v1's are ltm / diffrate_merge
    method: LearnedMethod = LearnedMethod.LTMP
    target_flops: float = 0.65
    data: str = "digits"
    limit: int | None = None
    epochs: float = 1.0
    batch_size: int = 64
    lr: float | None = None
    temperature: float | None = None
    flops_weight: float | None = None
    layers: list[int] | None = None
    device: str = "auto"
    seed: int = 0

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 2:  # v1's methods were our merge-only variants, and their weight was 50
            old = {"ltmp": "ltm", "diffrate": "diffrate_merge"}
            data = {**data, "method": old.get(data.get("method", "ltmp"), data.get("method")),
                    "flops_weight": data.get("flops_weight", 50.0)}
        return data

    @property
    def exportable(self) -> bool:
        return self.method not in (LearnedMethod.LTMP, LearnedMethod.LTM)  # thresholds: per-image counts

    def validate(self) -> None:
        if not 0 < self.target_flops <= 1:
            raise ConfigError(f"target_flops is a fraction of the base GFLOPs in (0, 1], got {self.target_flops}")
        if not 0 < self.epochs <= 1:
            raise ConfigError(f"epochs must be in (0, 1] (learned merging trains for at most one epoch), "
                              f"got {self.epochs}")
        for name in ("batch_size", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature", "flops_weight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def hyper(self) -> tuple[float, float, float]:
        """(lr, temperature, flops_weight) with the method's defaults."""
        lr, temp, weight = {LearnedMethod.LTMP: (0.005, 0.1, 10.0), LearnedMethod.DIFFRATE: (0.01, 1.0, 100.0),
                            LearnedMethod.LTM: (0.01, 0.05, 50.0),
                            LearnedMethod.DIFFRATE_MERGE: (0.5, 1.0, 50.0)}[self.method]
        return self.lr or lr, self.temperature or temp, self.flops_weight or weight


def merge_layers(model: nn.Module, layers: list[int] | None, method: LearnedMethod = LearnedMethod.LTMP,
                 ) -> list[int]:
    depth = len(model.blocks)
    first = 1 if method == LearnedMethod.DIFFRATE else 0  # DiffRate leaves the first block uncompressed
    layers = list(range(first, depth)) if layers is None else list(layers)
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
    layers = merge_layers(model, cfg.layers, cfg.method)
    pos = {layer: j for j, layer in enumerate(layers)}
    lr, temp, flops_weight = cfg.hyper
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    teacher = model.to(device).eval()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    data = load_data(cfg.data, data_config(model), limit=cfg.limit, purpose="train")
    loader = data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps = max(1, math.ceil(cfg.epochs * len(loader)))
    if cfg.method.faithful:
        rates = (lr, lr / 1000) if cfg.method == LearnedMethod.LTMP else (lr, lr)
        learned, record = train_relaxed(student, str(cfg.method), layers, loader, steps, target=cfg.target_flops,
                                        flops_weight=flops_weight, lr=rates, tau=temp, device=device)
        return learned.tolist(), {**record, "data": data.describe()}
    ltmp = cfg.method == LearnedMethod.LTM
    params = nn.Parameter(torch.full((len(layers),), 1.0 + 2 * temp if ltmp else 0.0, device=device))
    weights = threshold_weights(params=params, pos=pos, temperature=temp) if ltmp else rate_weights(params, pos, temp)
    state = TokenState(protected=student.num_prefix_tokens, prop_attn=True, method=None, backend="torch",
                       merge_weights=weights, soft=True)
    depth = len(student.blocks)
    install_blocks(student, state, [0] * depth, [i in pos for i in range(depth)])
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
        loss = kl + flops_weight * (frac - cfg.target_flops) ** 2
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


def install_ltm(model: nn.Module, layers: list[int], thresholds: list[float]) -> None:
    """Our merge-only variant: merge every pair above the layer's threshold."""
    by_layer = dict(zip(layers, thresholds))
    state = TokenState(protected=model.num_prefix_tokens, prop_attn=True, method=None,
                       merge_weights=threshold_weights(by_layer), summarize=trace_summary)
    depth = len(model.blocks)
    install_blocks(model, state, [0] * depth, [i in by_layer for i in range(depth)])


def install_ltmp(model: nn.Module, layers: list[int], thresholds: list[list[float]]) -> None:
    """LTMP at inference: per layer (merge, prune) thresholds; what the masks remove leaves the packed batch."""
    by_layer = {layer: (float(m), float(p)) for layer, (m, p) in zip(layers, thresholds)}
    protected = model.num_prefix_tokens

    def step(i: int, x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor,
             importance: torch.Tensor, source: torch.Tensor | None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        merge, prune = by_layer[i]
        return ltmp_reduce(x, size, mask, keys, importance, threshold_gate(merge, 1.0), threshold_gate(prune, 1.0),
                           protected, source)

    state = TokenState(protected=protected, prop_attn=True, method=None, step=step, summarize=trace_summary)
    depth = len(model.blocks)
    install_blocks(model, state, [0] * depth, [i in by_layer for i in range(depth)])


def install_diffrate(model: nn.Module, prune: list[int], drop: list[int]) -> None:
    """DiffRate at inference: per block, ``prune[i]`` tokens pruned and ``drop[i]`` removed in all."""
    state = TokenState(protected=model.num_prefix_tokens, prop_attn=True, method=TokenMethod.DIFFRATE)
    install_blocks(model, state, drop, [False] * len(model.blocks))
    for blk, r in zip(model.blocks, prune):
        blk._vc_prune = int(r)


def merge_schedule(model: nn.Module, layers: list[int], rates: list[float]) -> list[int]:
    """Our merge-only DiffRate variant: the learned merge counts as a ToMe schedule."""
    by_layer = dict(zip(layers, rates))
    return capped(model, [max(0, round(by_layer.get(i, 0.0))) for i in range(len(model.blocks))])


def _install(model: nn.Module, cfg: LearnedMergeConfig, state: dict[str, Any]) -> None:
    """The learned thresholds or schedule of ``state``; nothing without layers."""
    if not state.get("layers"):
        return
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply one token reduction method")
    if cfg.method == LearnedMethod.LTMP:
        install_ltmp(model, state["layers"], state["values"])
    elif cfg.method == LearnedMethod.LTM:
        install_ltm(model, state["layers"], state["values"])
    elif cfg.method == LearnedMethod.DIFFRATE:
        install_diffrate(model, state["prune"], state["schedule"])
    else:
        install_tome(model, state["schedule"], TokenMergeConfig(schedule=state["schedule"]))


@register_transform(LearnedMergeConfig, rebuild=_install)
def learned_merge_(model: nn.Module, cfg: LearnedMergeConfig, ctx: TransformContext) -> dict[str, Any]:
    """Learn the per-layer thresholds / rates and install them in place."""
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply one token reduction method")
    layers = merge_layers(model, cfg.layers, cfg.method)
    if not layers:  # nowhere to merge: strength zero, the model is left as it is
        return {"layers": []}
    values, record = train_merge(model, cfg)
    model_info(model).provenance["learned_merge"] = record  # reports show the training beside the point
    out: dict[str, Any] = {"layers": layers, "values": values, "training": record}
    if cfg.method == LearnedMethod.DIFFRATE:
        n_patch = model.patch_embed.num_patches
        out["prune"], out["schedule"] = diffrate_schedule(torch.tensor(values), layers, len(model.blocks), n_patch)
        out["values"] = {"kept": _kept(out["prune"], out["schedule"], n_patch)}  # the logits are not needed
    elif cfg.method == LearnedMethod.DIFFRATE_MERGE:
        out["schedule"] = merge_schedule(model, layers, values)
    _install(model, cfg, out)
    return out


def _kept(prune: list[int], drop: list[int], n_patch: int) -> list[list[int]]:
    """Patch tokens per block after pruning and after merging (DiffRate's kept numbers, CLS excluded)."""
    out, cur = [], n_patch
    for p, d in zip(prune, drop):
        out.append([cur - p, cur - d])
        cur -= d
    return out


__all__ = ["LearnedMergeConfig", "LearnedMethod", "learned_merge_"]

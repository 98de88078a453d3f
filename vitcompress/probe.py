"""A linear probe: a classifier fitted on a frozen pretrained backbone's features.

This is how a real pretrained backbone (a DINOv2 checkpoint without a head, say) becomes a classifier that every
method can be measured on (``recipes/dinov2s_cifar10.yaml``). The backbone runs once per image: its pre-logit
features (what timm's head sees: the pooled, normed token) are cached per backbone, data and preprocessing, and the
head is a multinomial logistic regression on standardised features, its L2 weight chosen on held-out train images,
then folded back into timm's own ``nn.Linear`` head, so the result is a plain timm model.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bench import BenchConfig
from .data import ImageData
from .errors import ConfigError
from .evaluate import predict
from .io import cache_dir, cached_tensors
from .models import classifier_keys, model_info


def _digest(model: nn.Module, data: ImageData) -> str:
    """A key for ``model``'s features on ``data``: the backbone's weights (not the head), architecture and images."""
    h = hashlib.sha256()
    info = model_info(model)
    h.update(json.dumps({"arch": info.arch, "kwargs": info.kwargs, "data": data.describe()}, sort_keys=True,
                        default=str).encode())
    head = set(classifier_keys(model))
    for k, v in sorted(model.state_dict().items()):
        if k not in head:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def features(model: nn.Module, data: ImageData, *, cfg: BenchConfig | None = None, progress: bool = False,
             log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features [N,D] (float32) and labels [N] of ``data`` under ``model``'s frozen backbone; read from the
    cache (``$VITCOMPRESS_CACHE/features``) when this backbone has seen these images before."""
    def compute() -> dict[str, torch.Tensor]:
        log(f"probe: computing the backbone's features of {len(data)} images of {data.name} (cached afterwards)")
        backbone = copy.deepcopy(model)
        backbone.reset_classifier(0)  # timm: the model now returns what the head would see, [B,D]
        feats, labels, _ = predict(backbone, data, cfg=cfg or BenchConfig(dtype="fp32"), progress=progress)
        return {"features": feats, "labels": labels}

    got, hit = cached_tensors(cache_dir() / "features" / f"{_digest(model, data)}.safetensors", compute)
    feats, labels = got["features"], got["labels"]
    if hit:
        log(f"probe: reusing cached features of {data.name} ({len(labels)} images)")
        return feats, labels
    return feats.clone(), labels.clone()  # normal tensors (predict made them in inference mode): the fit needs grads


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *, steps: int = 300,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on features ``x`` [N,D] with labels ``y`` [N]: mean cross-entropy +
    ``weight_decay``/2 ||W||^2 on standardised features, by full-batch L-BFGS. Returns the folded head (weight
    [C,D], bias [C]) that applies to the raw features: ``x @ W.T + b``."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / std).detach()
    return w_raw.float(), (b - w_raw @ mean).detach().float()


def top1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Top-1 (%) of the linear head (weight [C,D], bias [C]) on features ``x`` [N,D], labels ``y`` [N]."""
    return round(100.0 * float(((x @ weight.T + bias).argmax(1) == y).float().mean()), 2)


def fit_probe(model: nn.Module, train: ImageData, heldout: ImageData, weight_decays: Sequence[float], *,
              cfg: BenchConfig | None = None, progress: bool = False, log: Callable[[str], None] = print,
              ) -> dict[str, Any]:
    """Fit ``model``'s classifier (in place) on its frozen backbone's features of ``train``, with the weight decay
    of ``weight_decays`` that scores best on ``heldout``. Returns the choice and the held-out top-1 of each."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"a linear probe needs a linear classifier; this model has {type(head).__name__} "
                          "(set num_classes)")
    if not weight_decays:
        raise ConfigError("probe_weight_decay: give at least one weight decay to choose from")
    x, y = features(model, train, cfg=cfg, progress=progress, log=log)
    hx, hy = features(model, heldout, cfg=cfg, progress=progress, log=log)
    if int(y.max()) >= head.out_features:
        raise ConfigError(f"data has {int(y.max()) + 1} classes but the model has {head.out_features} outputs "
                          "(set num_classes)")
    scores: dict[str, float] = {}
    best: tuple[float, float, tuple[torch.Tensor, torch.Tensor]] | None = None
    for wd in weight_decays:
        w, b = fit_logistic(x, y, head.out_features, float(wd))
        scores[f"{wd:g}"] = top1(hx, hy, w, b)
        log(f"probe: weight decay {wd:g}: held-out top-1 {scores[f'{wd:g}']:.2f} %")
        if best is None or scores[f"{wd:g}"] > best[0]:
            best = (scores[f"{wd:g}"], float(wd), (w, b))
    assert best is not None
    with torch.no_grad():
        head.weight.copy_(best[2][0])
        head.bias.copy_(best[2][1])
    return {"probe_weight_decay": best[1], "heldout_top1": best[0], "heldout_images": len(hy),
            "heldout_by_weight_decay": scores, "train_images": len(y), "train_top1": top1(x, y, *best[2])}

"""``vitcompress train``: train or fine-tune a ViT classifier from a recipe and save it as an artifact.

The loop is :func:`vitcompress.training.fit`. Offline there are no pretrained weights, so this is how the
digits and CIFAR-10 testbeds (``recipes/digits_vit.yaml``, ``recipes/cifar10_vit.yaml``) are made;
:func:`baseline` trains a recipe once and reuses it from the cache afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .artifact import is_artifact, read_manifest, save_artifact
from .bench import BenchConfig, Dtype
from .data import ImageData, load_data
from .device import resolve_device
from .errors import ConfigError, UserError, check_positive
from .evaluate import accuracy_metrics, predict
from .io import cache_dir
from .models import build_model, data_config
from .probe import fit_probe
from .recipes import recipe_path
from .training import OptimConfig, fit


@dataclasses.dataclass
class TrainConfig(OptimConfig):
    """Everything a training run depends on; a recipe YAML is this dict (``train:`` section).

    probe: fit only the classifier, on the frozen backbone's features (computed once and cached): a linear probe
    whose L2 weight is the one of ``probe_weight_decay`` that scores best on ``heldout`` held-out train images
    (``heldout:N:DATA``, disjoint from the ``limit`` training images); the optimiser settings then do not apply.
    eval_limit: evaluate on this many evenly spaced images of ``eval_data``.
    """

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
    eval_limit: int | None = None
    probe: bool = False
    probe_weight_decay: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    heldout: int = 2000

    def validate(self) -> None:
        super().validate()
        check_positive("epochs", self.epochs)
        check_positive("limit", self.limit)
        check_positive("eval_limit", self.eval_limit)
        check_positive("heldout", self.heldout)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML into a dict (a mapping at the top level)."""
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


def train(cfg: TrainConfig, out: str | Path | None = None, *, progress: bool = False,
          recipe: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """Train per ``cfg``; save an artifact at ``out`` when given. Returns (model, metrics)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **cfg.model_kwargs)
    dcfg = data_config(model)
    data = load_data(cfg.data, dcfg, split=cfg.split, limit=cfg.limit, purpose="train")
    if not data.has_labels:
        raise ConfigError(f"cannot train on '{cfg.data}': it has no labels")
    n_classes = model.num_classes
    if data.num_classes and data.num_classes > n_classes:
        raise ConfigError(f"data has {data.num_classes} classes but the model has {n_classes} outputs "
                          "(set num_classes in model_kwargs)")
    if cfg.probe:
        return _train_probe(model, cfg, data, dcfg, out, progress=progress, recipe=recipe, log=log)
    model.to(device).train()
    loader = data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)

    loss_avg, train_s = fit(model, loader, loss_fn, cfg, device, progress=progress)
    steps = cfg.epochs * len(loader)
    model.eval()
    metrics: dict[str, Any] = {"train_seconds": round(train_s, 1), "final_loss": round(loss_avg, 4),
                               "epochs": cfg.epochs, "steps": steps, "device": str(device)}
    metrics.update(_evaluate(model, cfg, dcfg, progress))
    _save(model, cfg, data, out, metrics, recipe)
    return model, metrics


def _evaluate(model: nn.Module, cfg: TrainConfig, dcfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Top-1 / top-5 of the trained ``model`` on ``cfg.eval_data`` (nothing when there is none)."""
    if not cfg.eval_data:
        return {}
    eval_data = load_data(cfg.eval_data, dcfg, limit=cfg.eval_limit)
    logits, labels, _ = predict(model, eval_data, cfg=BenchConfig(device=cfg.device, dtype=cfg.dtype),
                                progress=progress)
    acc = accuracy_metrics(logits, labels, None)
    return {"eval_data": f"{cfg.eval_data}:{eval_data.split}", "top1": round(acc["top1"], 2),
            "top5": round(acc["top5"], 2), "eval_images": acc["n_images"]}


def _save(model: nn.Module, cfg: TrainConfig, data: ImageData, out: str | Path | None, metrics: dict[str, Any],
          recipe: dict[str, Any] | None) -> None:
    if out is not None:
        prov = {"train": cfg.to_dict(), "data": data.describe()}
        if recipe is not None:
            prov["recipe"] = recipe
        save_artifact(model, out, metrics=metrics, provenance=prov)


def _train_probe(model: nn.Module, cfg: TrainConfig, data: ImageData, dcfg: dict[str, Any], out: str | Path | None,
                 *, progress: bool, recipe: dict[str, Any] | None, log: Callable[[str], None],
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The ``probe`` mode of :func:`train`: the classifier alone, fitted on the frozen backbone's features."""
    bench = BenchConfig(device=cfg.device, dtype=Dtype.FP32)  # the head is fitted on the fp32 features
    heldout = load_data(f"heldout:{cfg.heldout}:{cfg.data}", dcfg, purpose="train")
    start = time.perf_counter()
    metrics: dict[str, Any] = fit_probe(model, data, heldout, cfg.probe_weight_decay, cfg=bench, progress=progress,
                                        log=log)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    model.eval()
    metrics.update(_evaluate(model, cfg, dcfg, progress))
    _save(model, cfg, data, out, metrics, recipe)
    return model, metrics


def recipe_config(doc: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a recipe (its ``train:`` section) with ``overrides`` (CLI flags) applied. A new
    ``data`` also becomes the eval data when the recipe evaluates on its training data (its test split then)."""
    section = doc.get("train", doc)
    if overrides.get("checkpoint"):  # a local checkpoint replaces the recipe's hub weights
        overrides.setdefault("pretrained", False)
    if "data" in overrides and "eval_data" not in overrides and section.get("eval_data") == section.get("data"):
        overrides["eval_data"] = overrides["data"]
    return TrainConfig.from_dict({**section, **overrides})


def baseline(recipe: str = "digits_vit", *, overrides: dict[str, Any] | None = None, progress: bool = False,
             log=print) -> Path:
    """Path of the trained testbed artifact for ``recipe`` (with ``overrides``: TrainConfig fields such as
    ``data`` or ``checkpoint``); trains it on a cache miss."""
    data = load_recipe(recipe_path(recipe))
    cfg = recipe_config(data, **(overrides or {}))
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"{Path(str(recipe)).stem}-{key}"
    if is_artifact(out):
        try:
            read_manifest(out)
            log(f"reusing trained baseline {out}")
            return out
        except UserError:
            pass
    log(f"training baseline from {recipe} -> {out}")
    train(cfg, out, progress=progress, recipe=data, log=log)
    return out

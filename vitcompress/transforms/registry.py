"""The transform registry and its one in-place verb, :func:`compress_`.

Importing :mod:`vitcompress.transforms` (the package) registers the built-in transforms; this module only
holds the registry, so that each method's module can import it without a cycle.

A compression method is a :class:`~vitcompress.config.Config` subclass plus one function registered
with :func:`register_transform`, and, when applying it solves something from data, a *rebuild*::

    def _rebuild(model, config, state) -> None: ...        # the structure, from the recorded state alone

    @register_transform(TokenMergeConfig, rebuild=_rebuild)
    def _merge(model, config, ctx) -> dict | None: ...    # solves on ctx's data, modifies model in place

The function may return a JSON-able *state* (a solved schedule, pruned shapes, ...). ``compress_``
records ``{name, version, config, state}`` in the model's history, which the artifact stores; loading an
artifact calls each record's rebuild (:func:`restore_`) to rebuild the exact structure before the weights
are loaded. A transform without a rebuild is deterministic in its config: restoring re-applies it with no data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..artifact import WEIGHTS, read_manifest
from ..config import Config
from ..errors import ConfigError
from ..models import model_info


@dataclasses.dataclass
class TransformContext:
    """What a transform gets besides the model and its config.

    calib: calibration batches ``(images [B,3,H,W], labels [B], groups [B])`` from the *train* split (what
    :func:`~vitcompress.pipeline.calibration_batches` yields; a bare ``images`` tensor or ``(images, labels)`` is
    accepted too), or None.
    teacher: the uncompressed model, for transforms that train (recovery); set by ``pipeline.apply_stack``.
    """

    calib: Iterable[Any] | None = None
    teacher: nn.Module | None = None


TransformFn = Callable[[nn.Module, Any, TransformContext], "dict[str, Any] | None"]
RebuildFn = Callable[[nn.Module, Any, "dict[str, Any]"], None]
_REGISTRY: dict[str, tuple[type[Config], TransformFn, RebuildFn | None]] = {}


def register_transform(config_cls: type[Config], *, rebuild: RebuildFn | None = None,
                       ) -> Callable[[TransformFn], TransformFn]:
    """Register ``fn`` as the transform applied for ``config_cls`` (keyed by ``config_cls.NAME``).

    rebuild: ``(model, config, state)`` rebuilds the structure from a recorded state (loading an artifact);
    None when ``fn`` with no data rebuilds it exactly (the transform is deterministic in its config).
    """

    def deco(fn: TransformFn) -> TransformFn:
        _REGISTRY[config_cls.NAME] = (config_cls, fn, rebuild)
        return fn

    return deco


def registered() -> dict[str, type[Config]]:
    """Names of all registered transforms and their config classes."""
    return {name: entry[0] for name, entry in _REGISTRY.items()}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a registered config from its versioned dict."""
    name = data.get("name")
    if name not in _REGISTRY:
        raise ConfigError(f"unknown transform '{name}' (known: {', '.join(sorted(_REGISTRY)) or 'none'})")
    return _REGISTRY[name][0].from_dict(data)


def compress_(
    model: nn.Module,
    config: Config,
    *,
    calib: Iterable[Any] | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Apply one registered transform to ``model`` in place and record it in the model's history."""
    if config.NAME not in _REGISTRY:
        raise ConfigError(f"no transform registered for config '{config.NAME}'")
    info = model_info(model)
    if not info.transforms and info.source:  # the first transform on an artifact: it becomes the base
        sha = read_manifest(info.source).get("files", {}).get(WEIGHTS, {}).get("sha256")
        info.base = {"kind": "artifact", "path": info.source, "sha256": sha}
    fn = _REGISTRY[config.NAME][1]
    state = fn(model, config, TransformContext(calib=calib, teacher=teacher)) or {}
    info.transforms.append({"name": config.NAME, "version": config.VERSION, "config": config.to_dict(), "state": state})
    return model


def restore_(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """Replay recorded transforms structurally (used when loading an artifact)."""
    info = model_info(model)
    for rec in records:
        config = config_from_dict(rec["config"])
        _, fn, rebuild = _REGISTRY[config.NAME]
        if rebuild is None:
            fn(model, config, TransformContext())
        else:
            rebuild(model, config, rec.get("state") or {})
        info.transforms.append(rec)
    return model

"""Model loading: a timm id (optionally pretrained or with a checkpoint) or a vitcompress artifact.

Every model vitcompress returns carries a :class:`ModelInfo` (``model.vitcompress_info``): the timm id
and kwargs it was built from, the ordered transforms applied to it, and where its uncompressed base lives.
That is what lets an artifact rebuild exactly the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants as hub
import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from .errors import CheckpointError, ModelError, note

INFO_ATTR = "vitcompress_info"
SUPPORTED_POOLS = ("token", "avg", "", "map")  # map: the attention pool (SigLIP)


@dataclasses.dataclass
class ModelInfo:
    """Provenance carried by every vitcompress model.

    arch/kwargs: what ``timm.create_model`` is called with to rebuild the architecture.
    transforms: ordered ``{name, version, config, state}`` records (see :mod:`vitcompress.transforms`).
    base: how to rebuild the uncompressed model this one came from (a dict), or None when unknown.
    source: the artifact directory this model was loaded from, if any.
    """

    arch: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    base: dict[str, Any] | None = None
    source: str | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


def model_info(model: nn.Module) -> ModelInfo:
    """The model's :class:`ModelInfo`; a plain timm model gets one from its ``pretrained_cfg``."""
    info = getattr(model, INFO_ATTR, None)
    if info is None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            raise ModelError(f"{type(model).__name__} was not built by timm or vitcompress: "
                             "use vitcompress.create_model")
        check_supported(model, arch)
        info = ModelInfo(arch=arch)
        setattr(model, INFO_ATTR, info)
    return info


def build_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a supported ViT from a timm id (artifact directories are loaded by :func:`vitcompress.create_model`).

    ``kwargs`` (``img_size``, ``patch_size``, ``num_classes``, ``depth``, ...) pass through to
    ``timm.create_model``; they must be JSON-serializable so the artifact can rebuild the model.
    Returns a model in eval mode on the CPU.
    """
    path = Path(name)
    if path.is_dir():
        raise ModelError(f"{name} is a directory but not a vitcompress artifact (no vitcompress.json)")
    if path.suffix in CHECKPOINT_SUFFIXES and path.exists():
        raise ModelError(f"{name} is a checkpoint file: pass a timm id as MODEL and --checkpoint {name}")
    hub_id = name.startswith(("hf-hub:", "hf_hub:"))
    if not hub_id and (os.sep in name or name.startswith(".")) and not path.exists():
        raise ModelError(f"no such artifact directory: {name}")
    if not hub_id and not timm.is_model(name):
        hint = difflib.get_close_matches(name, timm.list_models(["vit_*", "deit*"]), n=1)
        raise ModelError(f"unknown model '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    if pretrained and checkpoint:
        raise ModelError("give either --pretrained or --checkpoint, not both")
    try:
        with _offline_unless_reachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(f"bad model option for '{name}': {exc}") from None
    except Exception as exc:  # hub download, offline, gated repo, ...
        if not pretrained:
            raise
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not fetch pretrained weights for '{name}' (offline?): {reason}; "
            "use --checkpoint FILE with a local state dict instead"
        ) from None
    check_supported(model, name)
    info = ModelInfo(arch=name, kwargs=dict(kwargs))
    if pretrained or checkpoint:
        info.base = {"kind": "timm", "arch": name, "kwargs": dict(kwargs), "pretrained": pretrained,
                     "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None}
    setattr(model, INFO_ATTR, info)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host answers a TCP connection within ``timeout`` seconds."""
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable(pretrained: bool) -> Iterator[None]:
    """Offline, huggingface_hub retries each file for about a minute, printing a line per retry; when the hub does
    not answer a quick connection, its offline mode is on for this load, so weights in the local cache still load
    and missing ones fail at once. (Its offline flag is read from the environment at import, hence the attribute.)"""
    if not pretrained or hub.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse anything but timm VisionTransformer models built from standard Block/Attention modules."""
    def refuse(why: str) -> ModelError:
        return ModelError(f"unsupported architecture '{name}' ({type(model).__name__}): {why}; "
                          "vitcompress supports timm VisionTransformer models (vit_*, deit_*, deit3_*)")

    if not isinstance(model, VisionTransformer):
        raise refuse("not a timm VisionTransformer")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise refuse(f"block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}, "
                         "not the standard Block/Attention")
        # a plain VisionTransformer may carry other parts (mlp_layer=SwiGLU, norm_layer=RmsNorm, ...): each method
        # assumes these, so anything else is refused here rather than failing deep inside a transform
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc1, nn.Linear):
            raise refuse(f"block {i}'s MLP is {type(blk.mlp).__name__} (a gated / SwiGLU MLP), not timm's Mlp")
        for part in ("norm1", "norm2"):
            if not isinstance(getattr(blk, part), nn.LayerNorm):
                raise refuse(f"block {i}'s {part} is {type(getattr(blk, part)).__name__}, not a LayerNorm")
        if not isinstance(blk.attn.qkv, nn.Linear):
            raise refuse(f"block {i}'s attention has no fused qkv Linear")
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        raise refuse(f"the patch embedding is {type(model.patch_embed).__name__} without a Conv2d projection "
                     "(an hMLP stem?)")
    if model.global_pool not in SUPPORTED_POOLS:
        raise refuse(f"global_pool='{model.global_pool}' is not supported")


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config for ``model`` (size, crop, mean/std), with the size the model really takes.

    An exported model (``vitcompress.export.RuntimeModel``) carries the config recorded at export.
    """
    exported = getattr(model, "exported_data_config", None)
    if exported is not None:
        return dict(exported)
    cfg = dict(resolve_model_data_config(model))
    h, w = model.patch_embed.img_size
    cfg["input_size"] = (model.patch_embed.proj.in_channels, int(h), int(w))
    return cfg


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS + distillation + register tokens: the tokens compression must never merge or drop."""
    return int(model.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle (weights_only); unwrap common containers."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            sd: Any = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: corrupt or truncated ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a timm state dict into ``model`` as timm loads pretrained weights, strict for the backbone.

    Original-format checkpoints are remapped through timm, position embeddings trained at another image size are
    resampled to the model's patch grid (timm's ``resample_abs_pos_embed``), and a classifier that is missing from
    the file or has another class count is replaced by a fresh one (a one-line :class:`Note` says so). Every other
    missing, unexpected or mis-shaped key is refused.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in sd.keys() & own.keys()):
        # timm's own filter: original-format remapping and pos_embed resampling to the model's grid (bicubic);
        # if it cannot handle the file, the strict load below names what does not match
        with contextlib.suppress(Exception):
            sd = checkpoint_filter_fn(sd, model)
    sd, fresh = _fresh_classifier(model, sd, str(path))
    load_state_dict_strict(model, sd, str(path))
    if fresh:  # said only once the backbone has loaded: a refused file gets its error alone
        note(fresh)
    return model


HEAD_SEED = 0
"""Seed of a fresh classifier: rebuilding a model from the same checkpoint gives the same head (so that the base a
compressed model records is the same model when it is rebuilt)."""


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s classifier(s) (``head``, and ``head_dist`` for distilled models)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    prefixes = (*(f"{n}." for n in ((names,) if isinstance(names, str) else names)), "head_dist.")
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def _fresh_classifier(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                      ) -> tuple[dict[str, torch.Tensor], str | None]:
    """``sd`` with its classifier replaced by a freshly initialised one for ``model`` when the file has no classifier
    or one of another shape (as timm does when ``num_classes`` differs from the pretrained one), and the note that
    says so (None when the file's classifier fits)."""
    own = model.state_dict()
    head = classifier_keys(model)
    file_head = [k for k in sd if k.startswith(("head.", "head_dist.")) and (k not in own or k in head)]
    if not file_head and not head:
        return sd, None
    if set(file_head) == set(head) and all(sd[k].shape == own[k].shape for k in head):
        return sd, None
    out = {k: v for k, v in sd.items() if k not in file_head}
    gen = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        for k in head:
            param = model.get_submodule(k.rpartition(".")[0]).get_parameter(k.rpartition(".")[2])
            if k.endswith("weight"):  # timm's classifier init: trunc_normal(std=0.02), zero bias
                param.copy_(torch.randn(param.shape, generator=gen).clamp_(-2, 2) * 0.02)
            else:
                param.zero_()
            out[k] = param.detach().clone()
    classes, name = getattr(model, "num_classes", 0), Path(source).name
    if not file_head:
        return out, f"{name} has no classifier: a fresh {classes}-class head (random weights until trained)"
    if not head:
        return out, f"{name}: its classifier is dropped (the model has num_classes=0: features only)"
    old = next((tuple(sd[k].shape) for k in file_head if k.endswith("weight")), None)
    return out, f"{name}: its classifier {old} does not fit {classes} classes: a fresh head (random weights until " \
        "trained)"


def _derived(model: nn.Module, key: str) -> bool:
    """Whether the module owning state-dict ``key`` rebuilds that buffer from the others when a file lacks it (it
    names it in ``_vc_derived_buffers``): files written before the buffer existed still load."""
    owner, _, name = key.rpartition(".")
    try:
        return name in getattr(model.get_submodule(owner), "_vc_derived_buffers", ())
    except AttributeError:
        return False


def _tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with the keys of a shared parameter that the file stores once (under another of its keys) filled in."""
    first: dict[int, str] = {}
    out = dict(sd)
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, nn.Parameter):
            key = first.setdefault(id(v), k)
            if k not in out and key in sd:
                out[k] = sd[key]
    return out


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not match."""
    own = model.state_dict()
    sd = _tied(model, sd)
    missing = [k for k in own if k not in sd and not _derived(model, k)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    def few(items: list[str], n: int) -> str:
        return ", ".join(items[:n]) + (", ..." if len(items) > n else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({few(missing, 3)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({few(unexpected, 3)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) ({few(shapes, 1)})")
    if problems:
        arch = getattr(model, INFO_ATTR, None)
        arch_name = arch.arch if arch else type(model).__name__
        raise CheckpointError(f"{source} does not match model '{arch_name}': " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)

"""Eventful Transformers: the config, the timm glue and the transform.

Each timm ``Block`` becomes an :class:`EventfulBlock` (a ``__class__`` switch: its submodules, weights and
state-dict keys stay). Following the paper, a block has three token gates, each in front of a token-wise
operation whose outputs it buffers:

1. before ``norm1 + qkv``: the picked tokens' q, k, v are recomputed and scattered into the buffered q, k, v;
2. before ``proj``: the attention is recomputed for every query over every key (it is the cheap part, and it
   must see the new keys), then the picked tokens' attention outputs go through ``proj``;
3. before ``norm2 + mlp``.

Unpicked tokens reuse their buffered outputs. The first frame after :meth:`EventfulModel.reset` processes every
token. With ``fraction: 1`` every gate picks every token and the model equals the per-frame model bit for bit;
under the threshold policy a clip that does not change re-processes nothing after its first frame.

The model's own class gains :class:`EventfulModel`: ``reset()`` between videos, clips [B,T,3,H,W] in one call,
and a refusal of frames that do not continue the streams it holds (a shuffled batch of separate images).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ...config import Config, StrEnum
from ...errors import ConfigError, DataError
from ..attention import split_heads
from ..registry import TransformContext, register_transform
from . import ops


class Policy(StrEnum):
    TOPK = "topk"  # the paper's top-r policy: a fixed fraction of the tokens per gate and frame
    THRESHOLD = "threshold"  # every token whose error norm exceeds the threshold


GATES = ("qkv", "proj", "mlp")


@dataclasses.dataclass
class EventfulConfig(Config):
    """policy: which tokens a gate re-processes. fraction (top-k): the share of tokens per gate and frame (1 = all:
    the per-frame model); threshold: the error norm (L2 over channels) above which a token is re-processed
    (0: every token that changed at all)."""

    NAME = "eventful"

    FAMILY = "video"
    VERSION = 1
    policy: Policy = Policy.TOPK
    fraction: float = 0.5
    threshold: float = 0.0

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if not self.threshold >= 0:  # also refuses NaN
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")

    def report_fields(self) -> dict[str, Any]:
        return {"policy": str(self.policy),
                "strength": self.fraction if self.policy == Policy.TOPK else self.threshold}


@dataclasses.dataclass
class GateStats:
    """Tokens re-processed per gate, summed over the frames that followed a first frame (which is always full)."""

    picked: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(GATES, 0))
    total: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(GATES, 0))

    def add(self, gate: str, picked: int, total: int) -> None:
        self.picked[gate] += picked
        self.total[gate] += total

    def fractions(self) -> dict[str, float]:
        return {g: self.picked[g] / self.total[g] if self.total[g] else 1.0 for g in GATES}


class EventfulBlock(Block):
    """A timm ``Block`` that, frame after frame, recomputes only the tokens its gates pick.

    State (``_vc_mem``): the gates' references and the operations' buffers, all [B,N,*]; None after a reset.
    """

    _vc_policy: Policy
    _vc_fraction: float
    _vc_threshold: float
    _vc_mem: dict[str, torch.Tensor] | None = None
    _vc_stats: GateStats
    _vc_scratch: dict[Any, torch.Tensor]  # shared by the model's blocks: x - ref of the gate running now
    _vc_dynamic_shapes = True  # the picked counts (threshold) and the state live outside any graph
    _vc_export_refusal = ("an Eventful model keeps per-stream state between frames, which an exported graph cannot "
                          "hold: export the model without it")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("an Eventful block does not take attention masks")
        mem = self._vc_mem
        if mem is None:  # a first frame: every token, and the state starts from it
            qkv = self.attn.qkv(self.norm1(x))
            a = self._attend(qkv)
            p = self.attn.proj_drop(self.attn.proj(a))
            mid = x + self.drop_path1(self.ls1(p))
            m = self.mlp(self.norm2(mid))
            self._vc_mem = {"ref_qkv": x.clone(), "qkv": qkv, "ref_proj": a, "proj": p, "ref_mlp": mid, "mlp": m}
            return mid + self.drop_path2(self.ls2(m))
        self._gate("qkv", x, lambda t: self.attn.qkv(self.norm1(t)))
        a = self._attend(mem["qkv"])
        self._gate("proj", a, lambda t: self.attn.proj_drop(self.attn.proj(t)))
        mid = x + self.drop_path1(self.ls1(mem["proj"]))
        self._gate("mlp", mid, lambda t: self.mlp(self.norm2(t)))
        return mid + self.drop_path2(self.ls2(mem["mlp"]))

    def flops_saved(self, model: nn.Module) -> float:
        """FLOPs per frame that this block's gates skip once a stream has started (the family protocol: a FLOP
        count runs one frame, a stream's first, which processes every token). Top-k: exact; threshold: 0, since
        what it skips depends on the video (``benchmarks/eventful.py`` counts it on clips)."""
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        k = self._picks(n)
        if k is None:
            return 0.0
        per_token = sum(2 * lin.in_features * lin.out_features
                        for lin in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2))
        return float((n - k) * per_token)

    def _picks(self, n: int) -> int | None:
        """Top-k: the tokens of N a gate re-processes per frame (1 to N); None under the threshold policy."""
        if self._vc_policy != Policy.TOPK:
            return None
        return min(n, max(1, round(self._vc_fraction * n)))

    def _gate(self, name: str, x: torch.Tensor, op: Any) -> None:
        """Gate ``name`` on input x [B,N,C]: re-run ``op`` on the tokens its policy picks, update the reference
        and the output buffer in place."""
        mem = self._vc_mem
        assert mem is not None
        ref, buf = mem[f"ref_{name}"], mem[name]
        b, n = x.shape[:2]
        k = self._picks(n)
        if k == n:  # every token: the dense op
            mem[f"ref_{name}"], mem[name] = x.clone(), op(x)
            self._vc_stats.add(name, b * n, b * n)
            return
        scratch = None
        if not torch.is_grad_enabled():  # inference: x - ref goes to one buffer that every gate of the model reuses
            key = (tuple(x.shape), x.dtype, x.device)
            scratch = self._vc_scratch.get(key)
            if scratch is None:
                scratch = self._vc_scratch[key] = torch.empty_like(x)
        err = ops.error_norm(x, ref, scratch)
        idx = ops.above(err, self._vc_threshold) if k is None else ops.top_k(err, k)
        self._vc_stats.add(name, idx.numel(), b * n)
        if idx.shape[1] == 0:
            return
        picked = ops.gather(x, idx)
        ops.scatter_(ref, idx, picked)
        ops.scatter_(buf, idx, op(picked))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B,N,3*D] (the qkv layer's output) -> attention output after timm's ``attn.norm`` [B,N,D], every
        query over every key, with the attention's own q_norm / k_norm / scale (as timm's fused path runs it)."""
        attn = self.attn
        b, n, _ = qkv.shape
        q, k, v = split_heads(attn, qkv)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        return attn.norm(o.transpose(1, 2).reshape(b, n, -1))


class EventfulModel:
    """Mixed into the converted model's own class: the stream protocol.

    ``model(clips)`` with clips [B,T,3,H,W]: B videos from their first frame, logits [B,T,K]. ``model(frames)``
    with frames [B,3,H,W]: the next frame of the B streams it holds (``stream_ids`` [B], optional, names them);
    ``reset()`` starts new videos.
    """

    _vc_stateful = True
    _vc_streams: torch.Tensor | int | None = None
    _vc_shape: tuple[int, ...] = ()
    _vc_amp: tuple[bool, torch.dtype] = (False, torch.float32)

    def reset(self) -> None:
        """Forget every stream: the next frame is processed whole."""
        for blk in self.blocks:  # type: ignore[attr-defined]
            blk._vc_mem = None
            blk._vc_scratch.clear()
        self._vc_streams = None

    def eventful_stats(self) -> GateStats:
        return self.blocks[0]._vc_stats  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, stream_ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 5:  # [B,T,3,H,W]: whole clips, each from its first frame
            self.reset()
            try:
                frames = []
                for t in range(x.shape[1]):  # a loop, not a comprehension: super() needs this frame
                    frames.append(super().forward(x[:, t]))  # type: ignore[misc]
                return torch.stack(frames, 1)
            finally:
                self.reset()
        self._check_streams(x, stream_ids)
        return super().forward(x)  # type: ignore[misc]

    def _check_streams(self, x: torch.Tensor, ids: torch.Tensor | None) -> None:
        """Refuse frames that cannot be the next frames of the held streams (a new batch size, other stream ids,
        another frame size, another autocast precision: the buffers hold the first frame's)."""
        held = self._vc_streams
        key: torch.Tensor | int = x.shape[0] if ids is None else ids.detach().cpu().clone()
        amp = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        if held is None:
            self._vc_streams, self._vc_shape, self._vc_amp = key, tuple(x.shape), amp
            return
        if amp[0] != self._vc_amp[0] or (amp[0] and amp[1] != self._vc_amp[1]):
            raise DataError("an Eventful model's stream changed precision (autocast) between frames: call "
                            "model.reset() first")
        if tuple(x.shape) != self._vc_shape:
            raise DataError(f"an Eventful model got frames of shape {tuple(x.shape)} after {self._vc_shape}: a video's "
                            "frames must keep their size and batch; call model.reset() between videos")
        if isinstance(held, torch.Tensor) != isinstance(key, torch.Tensor) or (
                isinstance(key, torch.Tensor) and not torch.equal(key, held)):  # type: ignore[arg-type]
            raise DataError("an Eventful model got frames of other streams than it holds (a shuffled batch?): "
                            "feed each video's frames in order, and call model.reset() between videos")


_CLASSES: dict[type, type] = {}


def _eventful_class(cls: type) -> type:
    if issubclass(cls, EventfulModel):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Eventful{cls.__name__}", (EventfulModel, cls), {"__module__": __name__})
    return _CLASSES[cls]


def eventful_(model: nn.Module, cfg: EventfulConfig) -> nn.Module:
    """Convert ``model`` (a timm ViT) in place into a stateful Eventful model."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b, Block) for b in blocks):
        raise ConfigError("Eventful converts timm ViT blocks: this model has none it can convert")
    if any(isinstance(b, EventfulBlock) for b in blocks):
        raise ConfigError("the model is already Eventful")
    if any(type(b) is not Block and not isinstance(b, EventfulBlock) for b in blocks):
        raise ConfigError("Eventful goes first in a stack: its blocks cannot also reduce tokens")
    if any(getattr(b.attn, "gate", None) is not None for b in blocks):
        raise ConfigError("Eventful does not support gated attention")
    stats, scratch = GateStats(), {}
    for blk in blocks:
        blk.__class__ = EventfulBlock
        blk._vc_policy, blk._vc_fraction, blk._vc_threshold = cfg.policy, cfg.fraction, cfg.threshold
        blk._vc_stats, blk._vc_scratch, blk._vc_mem = stats, scratch, None
    model.__class__ = _eventful_class(type(model))
    model.reset()  # type: ignore[attr-defined]
    return model


@register_transform(EventfulConfig)
def _eventful(model: nn.Module, cfg: EventfulConfig, ctx: TransformContext) -> None:
    """Deterministic in its config: restoring an artifact converts again."""
    eventful_(model, cfg)

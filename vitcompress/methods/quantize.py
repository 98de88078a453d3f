"""Post-training quantization of a ViT's Linear layers: simulated at any bit width, or W8A8 for real.

simulate: weights are rounded to nearest on a symmetric per-channel or per-group grid (the observer may
clip them), activations on an asymmetric per-tensor grid calibrated on train-split images, or per token on
the fly. The selected ``nn.Linear`` modules keep their weights and state-dict keys; their class is switched
to :class:`FakeQuantLinear`, which adds the activation scale and zero point as buffers. These points are
*accuracy-only*: they run in floating point.
deploy: W8A8 only so far. Each selected layer is replaced by an
:class:`~vitcompress.methods.int8_linear.Int8Linear` (int8 weights, int8 symmetric activations, an int32
GEMM through ``torch._int_mm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, StrEnum
from ..errors import ConfigError
from ..transforms import TransformContext, register_transform
from . import quant_ops as ops
from .int8_linear import Int8Linear
from .layers import replace_module, run_calibration
from .layers import select_layers as _select


class Mode(StrEnum):
    SIMULATE = "simulate"
    DEPLOY = "deploy"


class WeightGranularity(StrEnum):
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ActGranularity(StrEnum):
    PER_TENSOR = "per_tensor"  # static, calibrated
    PER_TOKEN = "per_token"  # dynamic


class Rounding(StrEnum):
    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # error-compensating, from calibration Hessians


class Reparam(StrEnum):
    NONE = "none"
    REPQ = "repq"  # RepQ-ViT: fold post-LayerNorm channel-wise ranges into the LayerNorm and the next Linear


class Observer(StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


@dataclasses.dataclass
class QuantConfig(Config):
    """w_bits / a_bits: 2..8, or None to leave weights / activations in floating point.

    layers / exclude: module names, aliases (qkv, proj, fc1, fc2, head), globs, or ``re:REGEX``.
    observer: how ranges are picked (weights: minmax or mse clip; activations: all three).
    """

    NAME = "quantize"
    VERSION = 1
    w_bits: int | None = 8
    a_bits: int | None = 8
    w_granularity: WeightGranularity = WeightGranularity.PER_CHANNEL
    group_size: int = 64
    a_granularity: ActGranularity = ActGranularity.PER_TENSOR
    observer: Observer = Observer.MINMAX
    percentile: float = 99.99
    layers: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    exclude: list[str] = dataclasses.field(default_factory=list)
    calib_size: int = 32
    mode: Mode = Mode.SIMULATE
    rounding: Rounding = Rounding.RTN
    gptq_damp: float = 0.01
    reparam: Reparam = Reparam.NONE
    backend: str = "auto"

    def validate(self) -> None:
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"backend must be auto, torch or triton (bitsandbytes is not built yet), "
                              f"got '{self.backend}'")
        if self.backend != "auto" and self.mode != Mode.DEPLOY:
            raise ConfigError("--backend selects the int8 GEMM of --mode deploy; simulate runs in floating point")
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits is not None and (int(bits) != bits or not 2 <= bits <= 8):
                raise ConfigError(f"{name} must be an integer from 2 to 8 (or none), got {bits}")
        if self.mode == Mode.DEPLOY and (self.w_bits != 8 or self.a_bits != 8
                                         or self.w_granularity != WeightGranularity.PER_CHANNEL):
            raise ConfigError("mode deploy executes W8A8 with per-channel weights (other widths: simulate); "
                              f"got w_bits={self.w_bits}, a_bits={self.a_bits}, {self.w_granularity}")
        if self.group_size < 1 or self.calib_size < 1:
            raise ConfigError(f"group_size and calib_size must be >= 1 (got {self.group_size}, {self.calib_size})")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not self.layers:
            raise ConfigError("no layers to quantize")
        if self.reparam == Reparam.REPQ and not self.static_acts:
            raise ConfigError("repq reparameterizes for static per-tensor activations: it needs a_bits and "
                              "a_granularity per_tensor")
        if self.rounding == Rounding.GPTQ and (self.w_bits is None or self.mode == Mode.DEPLOY):
            raise ConfigError("gptq rounds weights in simulate mode: it needs w_bits and --mode simulate")

    @property
    def static_acts(self) -> bool:
        return self.a_bits is not None and self.a_granularity == ActGranularity.PER_TENSOR

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges, RepQ and GPTQ are all computed from calibration images."""
        return self.static_acts or self.rounding == Rounding.GPTQ


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose input is fake-quantized (weights were fake-quantized in place).

    Buffers: a_scale, a_zero (scalars; used with static per-tensor activations).
    """

    _vc_a_bits: int | None
    _vc_per_token: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vc_a_bits is not None:
            x = ops.fake_quant_act_per_token(x, self._vc_a_bits) if self._vc_per_token else \
                ops.fake_quant_act(x, self.a_scale, self.a_zero, self._vc_a_bits)
        return F.linear(x, self.weight, self.bias)


def select_layers(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules the config names, in model order; every pattern must match something."""
    return _select(model, cfg.layers, cfg.exclude, what="quantized")


def calibrate(model: nn.Module, layers: list[tuple[str, nn.Linear]], cfg: QuantConfig,
              calib: Iterable[Any]) -> tuple[dict[str, tuple[float, float]], dict[str, torch.Tensor]]:
    """Per-layer input ranges (lo, hi) and, for GPTQ, input Hessians sum(x^T x) [I,I], over up to
    ``calib_size`` images with earlier transforms active (one pass on the float model).

    minmax keeps the extremes over all batches; percentile and mse average their per-batch choices.
    """
    seen: dict[str, list[tuple[float, float]]] = {n: [] for n, _ in layers}
    hessians: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if cfg.static_acts:
                seen[name].append(ops.act_range(args[0], str(cfg.observer), int(cfg.a_bits), cfg.percentile))
            if cfg.rounding == Rounding.GPTQ:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                hessians[name] = hessians.get(name, 0) + x.t() @ x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        run_calibration(model, calib, cfg.calib_size)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, ranges in seen.items():
        if not ranges:
            continue
        lows, highs = zip(*ranges)
        if cfg.observer == Observer.MINMAX:
            out[name] = (min(lows), max(highs))
        else:
            out[name] = (sum(lows) / len(lows), sum(highs) / len(highs))
    return out, hessians


def _convert(module: nn.Linear, cfg: QuantConfig) -> None:
    module.__class__ = FakeQuantLinear
    module._vc_a_bits = cfg.a_bits
    module._vc_per_token = cfg.a_granularity == ActGranularity.PER_TOKEN
    module.register_buffer("a_scale", torch.ones((), device=module.weight.device))
    module.register_buffer("a_zero", torch.zeros((), device=module.weight.device))


def repq_reparam_(model: nn.Module, cfg: QuantConfig, calib: Iterable[Any]) -> list[str]:
    """RepQ-ViT's scale reparameterization, in place, for each (LayerNorm -> Linear) pair: norm1 -> qkv and
    norm2 -> fc1, when those Linears are selected and activations are quantized per tensor.

    With per-channel asymmetric parameters (s, z) of the post-LayerNorm activation X and their means
    (s~, z~): r1 = s / s~, r2 = z - z~. The LayerNorm outputs X~ = (X + s r2) / r1 (gamma / r1,
    (beta + s r2) / r1) and the Linear takes W r1 and b - W (s r2), so the float function is unchanged while
    one per-tensor quantizer on X~ acts like per-channel quantization of X.
    """
    pairs = [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv") for i in range(len(model.blocks))]
    pairs += [(f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1") for i in range(len(model.blocks))]
    selected = {n for n, _ in select_layers(model, cfg)}
    pairs = [(n, lin) for n, lin in pairs if lin in selected
             and isinstance(model.get_submodule(n), nn.LayerNorm) and model.get_submodule(n).elementwise_affine]
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo[name] = torch.minimum(lo[name], x.amin(0)) if name in lo else x.amin(0)
            hi[name] = torch.maximum(hi[name], x.amax(0)) if name in hi else x.amax(0)
        return fn

    handles = [model.get_submodule(lin).register_forward_pre_hook(hook(lin)) for _, lin in pairs]
    try:
        run_calibration(model, calib, cfg.calib_size)
    finally:
        for h in handles:
            h.remove()
    for norm_name, lin_name in pairs:
        norm, lin = model.get_submodule(norm_name), model.get_submodule(lin_name)
        s, z = ops.act_qparams(lo[lin_name], hi[lin_name], int(cfg.a_bits))
        r1 = (s / s.mean()).clamp_min(1e-4)  # any r1 > 0 keeps the float function; avoid dead-channel blow-up
        r2 = z - torch.round(z.mean())
        shift = s * r2  # [C]
        with torch.no_grad():
            if lin.bias is not None:
                lin.bias.sub_((lin.weight.float() @ shift).to(lin.bias.dtype))
            lin.weight.mul_(r1.to(lin.weight.dtype)[None, :])
            norm.bias.copy_(((norm.bias.float() + shift) / r1).to(norm.bias.dtype))
            norm.weight.copy_((norm.weight.float() / r1).to(norm.weight.dtype))
    return [lin for _, lin in pairs]


def _deploy(model: nn.Module, layers: list[tuple[str, nn.Linear]], cfg: QuantConfig,
            ranges: dict[str, tuple[float, float]], restore: bool) -> dict[str, float]:
    per_token = cfg.a_granularity == ActGranularity.PER_TOKEN
    clips = {}
    for name, m in layers:
        if restore:
            new = Int8Linear(m.in_features, m.out_features, m.bias is not None, per_token, m.weight.device,
                             backend=cfg.backend)
        else:
            clip = ops.mse_weight_clip(m.weight, 8) if cfg.observer == Observer.MSE else 1.0
            absmax = max(abs(v) for v in ranges[name]) if name in ranges else None
            new = Int8Linear.from_linear(m, per_token=per_token, a_absmax=absmax, clip=clip, backend=cfg.backend)
            clips[name] = clip
        replace_module(model, name, new)
    return clips


@register_transform(QuantConfig)
def quantize_(model: nn.Module, cfg: QuantConfig, ctx: TransformContext) -> dict[str, Any]:
    """Quantize the selected layers in place; calibrates static activation ranges on ``ctx.calib``."""
    layers = select_layers(model, cfg)
    if cfg.w_bits is None and cfg.a_bits is None:
        return {"layers": [], "calibrated": 0}
    if ctx.restore:
        if cfg.mode == Mode.DEPLOY:
            _deploy(model, layers, cfg, {}, restore=True)
        else:
            for _, m in layers:
                _convert(m, cfg)
        return dict(ctx.state or {})
    ranges: dict[str, tuple[float, float]] = {}
    hessians: dict[str, torch.Tensor] = {}
    reparam: list[str] = []
    if cfg.needs_calibration:
        if ctx.calib is None:
            raise ConfigError("static activation ranges and gptq need calibration images (--calib-data)")
        if cfg.reparam == Reparam.REPQ:
            reparam = repq_reparam_(model, cfg, ctx.calib)
        ranges, hessians = calibrate(model, layers, cfg, ctx.calib)
    if cfg.mode == Mode.DEPLOY:
        clips = _deploy(model, layers, cfg, ranges, restore=False)
        return {"layers": [n for n, _ in layers], "calibrated": len(ranges), "deployable": True, "reparam": reparam,
                "weight_clip": {n: c for n, c in clips.items() if c != 1.0}}
    clips = {}
    for name, m in layers:
        if cfg.w_bits is not None:
            group = cfg.group_size if cfg.w_granularity == WeightGranularity.PER_GROUP else None
            if group and m.in_features % group:
                raise ConfigError(f"group_size {group} does not divide {name}'s {m.in_features} input features")
            if cfg.rounding == Rounding.GPTQ:
                new, clip = ops.gptq_quantize(m.weight, hessians[name], cfg.w_bits, group, cfg.gptq_damp), 1.0
            else:
                clip = ops.mse_weight_clip(m.weight, cfg.w_bits, group) if cfg.observer == Observer.MSE else 1.0
                new = ops.fake_quant_weight(m.weight, cfg.w_bits, group, clip)
            with torch.no_grad():
                m.weight.copy_(new)
            clips[name] = clip
        _convert(m, cfg)
        if name in ranges:
            scale, zero = ops.act_qparams(torch.tensor(ranges[name][0]), torch.tensor(ranges[name][1]), cfg.a_bits)
            m.a_scale.copy_(scale)
            m.a_zero.copy_(zero)
    return {"layers": [n for n, _ in layers], "calibrated": len(ranges), "deployable": False, "reparam": reparam,
            "weight_clip": {n: c for n, c in clips.items() if c != 1.0}}

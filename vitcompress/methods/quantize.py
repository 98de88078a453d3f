"""Post-training quantization of a ViT: simulated at any bit width, or deployed for real.

simulate (accuracy-only, runs in floating point): weights are rounded in place (RTN or GPTQ) on a symmetric
per-channel or per-group grid; activations are fake-quantized per tensor (calibrated on train-split
images) or per token; the attention matmuls' inputs and the softmax output (uniform, log2, logsqrt2) and the
patch embedding can be included. See :mod:`.quant_sim`.

deploy (executes low precision, stores low-bit weights):
- int W8A8: :class:`~.int8_linear.Int8Linear`, an int8 x int8 -> int32 GEMM (Triton on CUDA, ``torch._int_mm``);
- fp8 W8A8: :class:`~.lowbit_linear.Fp8Linear`, e4m3 x e4m3 through ``torch._scaled_mm``;
- weight-only int8 / int4 (per channel or group, RTN or GPTQ): :class:`~.lowbit_linear.WeightOnlyLinear`;
- ``backend bnb``: bitsandbytes LLM.int8 (W8A8) or NF4 (W4), :mod:`.bnb_linear`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.layers.attention import Attention
from torch import nn

from ..config import Config, StrEnum
from ..errors import ConfigError
from ..transforms import TransformContext, register_transform
from . import quant_ops as ops
from .bnb_linear import to_bnb
from .int8_linear import Int8Linear
from .layers import replace_module
from .layers import select_layers as _select
from .lowbit_linear import Fp8Linear, WeightOnlyLinear
from .quant_calib import calibrate, repq_reparam_
from .quant_sim import QUANTIZABLE, convert, set_grids

__all__ = ["QuantConfig", "quantize_", "repq_reparam_", "select_layers"]


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


NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' 4-bit quantizer takes


class SoftmaxQuant(StrEnum):
    NONE = "none"
    UNIFORM = "uniform"
    LOG2 = "log2"
    LOGSQRT2 = "logsqrt2"


class QuantDtype(StrEnum):
    INT = "int"
    FP8 = "fp8_e4m3"


@dataclasses.dataclass
class QuantConfig(Config):
    """w_bits / a_bits: 2..8, or None to leave weights / activations in floating point.

    layers / exclude: module names, aliases (qkv, proj, fc1, fc2, head, attn_matmul, patch_embed), globs,
    or ``re:REGEX``. observer: how ranges are picked (weights: minmax or mse clip; activations: all three).
    softmax: the quantizer of the attention probabilities (needs the attn_matmul layers).
    dtype: int grids, or fp8_e4m3 (W8A8 with float8 e4m3 weights and activations).
    backend (deploy): auto, torch, triton (the int8 GEMM) or bnb (bitsandbytes: w8 LLM.int8, w4 NF4).
    """

    NAME = "quantize"
    VERSION = 2  # v2 added softmax and dtype; v1 dicts load unchanged (their defaults are v1's behaviour)
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
    softmax: SoftmaxQuant = SoftmaxQuant.NONE
    dtype: QuantDtype = QuantDtype.INT
    backend: str = "auto"

    def validate(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits is not None and (int(bits) != bits or not 2 <= bits <= 8):
                raise ConfigError(f"{name} must be an integer from 2 to 8 (or none), got {bits}")
        if self.group_size < 1 or self.calib_size < 1:
            raise ConfigError(f"group_size and calib_size must be >= 1 (got {self.group_size}, {self.calib_size})")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not self.layers:
            raise ConfigError("no layers to quantize")
        if self.reparam == Reparam.REPQ and not self.static_acts:
            raise ConfigError("repq reparameterizes for static per-tensor activations: it needs a_bits and "
                              "a_granularity per_tensor")
        if self.rounding == Rounding.GPTQ and self.w_bits is None:
            raise ConfigError("gptq rounds weights: it needs w_bits")
        if self.softmax != SoftmaxQuant.NONE and self.a_bits is None:
            raise ConfigError("the softmax quantizer uses a_bits: set a_bits")
        if self.dtype == QuantDtype.FP8 and (self.w_bits != 8 or self.a_bits not in (8, None)
                                            or self.w_granularity != WeightGranularity.PER_CHANNEL):
            raise ConfigError("fp8_e4m3 is 8-bit with per-channel weights: w_bits 8, a_bits 8 or none")
        if self.backend not in ("auto", "torch", "triton", "bnb"):
            raise ConfigError(f"backend must be auto, torch, triton or bnb, got '{self.backend}'")
        if self.backend != "auto" and self.mode != Mode.DEPLOY:
            raise ConfigError("--backend picks how --mode deploy executes; simulate runs in floating point")
        if self.mode == Mode.DEPLOY:
            self._validate_deploy()

    def _validate_deploy(self) -> None:
        kind = self.deploy_kind
        if kind is None:
            raise ConfigError("mode deploy executes int W8A8 (per-channel), fp8_e4m3 W8A8, weight-only int8/int4 "
                              f"(a_bits none) or --backend bnb (w8 a8 / w4); got w_bits={self.w_bits}, "
                              f"a_bits={self.a_bits}, {self.w_granularity}, {self.dtype} (other widths: simulate)")
        if self.rounding == Rounding.GPTQ and kind != "weight_only":
            raise ConfigError("gptq is deployed weight-only (a_bits none); with activations, use --mode simulate")
        if kind == "bnb_nf4" and self.group_size not in NF4_BLOCKS:
            raise ConfigError(f"bitsandbytes NF4 takes blocks (--group-size) of {', '.join(map(str, NF4_BLOCKS))}; "
                              f"got {self.group_size}")
        if self.backend == "triton" and kind not in ("int8", "fp8"):
            raise ConfigError(f"--backend triton runs the int8 and fp8 W8A8 GEMMs; {kind} runs through torch")
        if self.softmax != SoftmaxQuant.NONE:
            raise ConfigError("softmax / attention-matmul quantization is simulate-only (deploy runs Linear layers)")

    @property
    def deploy_kind(self) -> str | None:
        """int8, fp8, weight_only, bnb_int8, bnb_nf4, or None when no deployed format fits."""
        w, a, per_channel = self.w_bits, self.a_bits, self.w_granularity == WeightGranularity.PER_CHANNEL
        if self.backend == "bnb":
            ok = self.dtype == QuantDtype.INT and self.reparam == Reparam.NONE and self.rounding == Rounding.RTN
            return {(8, 8): "bnb_int8", (4, None): "bnb_nf4"}.get((w, a)) if ok else None
        if self.dtype == QuantDtype.FP8:
            return "fp8" if a == 8 else None
        if a is None and w in (4, 8):
            return "weight_only"
        return "int8" if (w, a) == (8, 8) and per_channel else None

    @property
    def static_acts(self) -> bool:
        return self.a_bits is not None and self.a_granularity == ActGranularity.PER_TENSOR \
            and self.deploy_kind != "bnb_int8"  # LLM.int8 quantizes activations itself

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges, RepQ and GPTQ are all computed from calibration images."""
        return self.static_acts or self.rounding == Rounding.GPTQ

    @property
    def group(self) -> int | None:
        return self.group_size if self.w_granularity == WeightGranularity.PER_GROUP else None


def select_layers(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d / timm Attention modules the config names, in model order."""
    layers = _select(model, cfg.layers, cfg.exclude, what="quantized", types=QUANTIZABLE)
    linear_only = cfg.mode == Mode.DEPLOY
    for name, m in layers:
        if linear_only and not isinstance(m, nn.Linear):
            raise ConfigError(f"'{name}' is {type(m).__name__}: deploy executes Linear layers only (the attention "
                              "matmuls and the patch embedding are simulate-only)")
        if cfg.group and not isinstance(m, Attention) and _fan_in(m) % cfg.group:
            raise ConfigError(f"group_size {cfg.group} does not divide {name}'s {_fan_in(m)} input features")
        if linear_only and cfg.deploy_kind == "weight_only" and cfg.w_bits == 4 and m.in_features % 2:
            raise ConfigError(f"int4 packs two codes a byte: {name}'s {m.in_features} input features must be even")
    if cfg.softmax != SoftmaxQuant.NONE and not any(isinstance(m, Attention) for _, m in layers):
        raise ConfigError("a softmax quantizer needs the attention matmuls: add attn_matmul to the layers")
    return layers


def _fan_in(m: nn.Module) -> int:
    return m.weight[0].numel()


def _weight_clip(w: torch.Tensor, cfg: QuantConfig) -> float:
    """The clip ratio of the weight grid: searched by the mse observer, else 1 (the absmax)."""
    return ops.mse_weight_clip(w, cfg.w_bits, cfg.group) if cfg.observer == Observer.MSE else 1.0


def _deployed(m: nn.Linear, cfg: QuantConfig, rng: dict[str, tuple[float, float]] | None,
              hessian: torch.Tensor | None) -> tuple[nn.Module, float]:
    """The deployed replacement of Linear ``m`` and its weight clip. rng None: an empty one to restore into."""
    kind, per_token = cfg.deploy_kind, cfg.a_granularity == ActGranularity.PER_TOKEN
    if kind.startswith("bnb_"):
        return to_bnb(m, kind[4:], blocksize=cfg.group_size), 1.0
    if rng is None:
        if kind == "int8":
            return Int8Linear(m.in_features, m.out_features, m.bias is not None, per_token, m.weight.device,
                              backend=cfg.backend), 1.0
        if kind == "fp8":
            return Fp8Linear(m.in_features, m.out_features, m.bias is not None, per_token, m.weight.device,
                             cfg.backend), 1.0
        return WeightOnlyLinear(m.in_features, m.out_features, m.bias is not None, cfg.w_bits, cfg.group,
                                m.weight.device), 1.0
    absmax = max(abs(v) for v in rng[""]) if "" in rng else None
    if kind == "fp8":
        return Fp8Linear.from_linear(m, per_token=per_token, a_absmax=absmax, backend=cfg.backend), 1.0
    clip = _weight_clip(m.weight, cfg)
    if kind == "int8":
        return Int8Linear.from_linear(m, per_token=per_token, a_absmax=absmax, clip=clip, backend=cfg.backend), clip
    if hessian is not None:
        w, scale = ops.gptq_quantize(m.weight, hessian, cfg.w_bits, cfg.group, cfg.gptq_damp)
        return WeightOnlyLinear.from_linear(m, cfg.w_bits, cfg.group, weight=w, scale=scale), 1.0
    return WeightOnlyLinear.from_linear(m, cfg.w_bits, cfg.group, clip=clip), clip


def _round_weight_(m: nn.Module, cfg: QuantConfig, hessian: torch.Tensor | None) -> float:
    """Simulate: put a Linear / Conv2d weight on its grid in place; returns the clip used."""
    w = m.weight.reshape(m.weight.shape[0], -1)
    if cfg.dtype == QuantDtype.FP8:
        new, clip = ops.fake_quant_fp8(w, ops.fp8_scale(w.detach().abs().amax(1, keepdim=True))), 1.0
    elif hessian is not None:
        new, clip = ops.gptq_quantize(w, hessian, cfg.w_bits, cfg.group, cfg.gptq_damp)[0], 1.0
    else:
        clip = _weight_clip(w, cfg)
        new = ops.fake_quant_weight(w, cfg.w_bits, cfg.group, clip)
    with torch.no_grad():
        m.weight.copy_(new.reshape(m.weight.shape))
    return clip


@register_transform(QuantConfig)
def quantize_(model: nn.Module, cfg: QuantConfig, ctx: TransformContext) -> dict[str, Any]:
    """Quantize the selected layers in place; calibrates on ``ctx.calib`` (train-split images) when needed."""
    layers = select_layers(model, cfg)
    if cfg.w_bits is None and cfg.a_bits is None:
        return {"layers": [], "calibrated": 0}
    deploy, per_token, fp8 = cfg.mode == Mode.DEPLOY, cfg.a_granularity == ActGranularity.PER_TOKEN, \
        cfg.dtype == QuantDtype.FP8
    if ctx.restore:
        for name, m in layers:
            if deploy:
                replace_module(model, name, _deployed(m, cfg, None, None)[0])
            else:
                convert(m, cfg.a_bits, per_token, fp8, str(cfg.softmax))
        return dict(ctx.state or {})
    reparam: list[str] = []
    if cfg.needs_calibration and ctx.calib is None:
        raise ConfigError("static activation ranges and gptq need calibration images (--calib-data)")
    if cfg.reparam == Reparam.REPQ:
        reparam = repq_reparam_(model, cfg, ctx.calib)
    if not deploy:  # attention is observed (in float) through its quantized class during calibration
        for _, m in layers:
            if isinstance(m, Attention):
                convert(m, cfg.a_bits, per_token, fp8, str(cfg.softmax))
    ranges, hessians = calibrate(model, layers, cfg, ctx.calib) if cfg.needs_calibration else ({}, {})
    clips = {}
    for name, m in layers:
        if deploy:
            new, clips[name] = _deployed(m, cfg, ranges.get(name, {}), hessians.get(name))
            replace_module(model, name, new)
            continue
        if cfg.w_bits is not None and not isinstance(m, Attention):
            clips[name] = _round_weight_(m, cfg, hessians.get(name))
        if not isinstance(m, Attention):
            convert(m, cfg.a_bits, per_token, fp8)
        set_grids(m, ranges.get(name, {}))
    return {"layers": [n for n, _ in layers], "calibrated": len(ranges), "deployable": deploy,
            "deploy_kind": cfg.deploy_kind if deploy else None, "reparam": reparam,
            "weight_clip": {n: c for n, c in clips.items() if c != 1.0}}

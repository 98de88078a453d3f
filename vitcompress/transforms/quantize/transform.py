"""Post-training quantization of a ViT: simulated at any bit width, or deployed for real.

simulate (accuracy-only, runs in floating point): weights are rounded in place (RTN, GPTQ, or learned by block
reconstruction, BRECQ: see :mod:`.reconstruct`) on a symmetric
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

import copy
from typing import Any

import torch
from timm.layers.attention import Attention
from torch import nn

from ...errors import ConfigError
from ...kernels.tuned import dense_faster, table_for
from ...ui import tracked
from ..layers import replace_module
from ..layers import select_layers as _select
from ..registry import TransformContext, register_transform
from . import ops
from .bnb import to_bnb
from .brecq import brecq_
from .calib import calibrate, layer_hessian, repq_reparam_, smoothquant_reparam_
from .config import (
    BRECQS,
    SEARCHED,
    ActGranularity,
    Mode,
    Observer,
    QuantConfig,
    QuantDtype,
    Reparam,
    Rounding,
    SoftmaxQuant,
)
from .int8_linear import Int8Linear
from .lowbit_linear import Fp8Linear, WeightOnlyLinear
from .reconstruct import reconstruct_blocks_
from .search import search_scales
from .simulate import (
    QUANTIZABLE,
    convert,
    deploy_attention_,
    post_gelu_layers,
    set_grids,
    set_symmetric_grids,
)

__all__ = ["QuantConfig", "quantize_", "repq_reparam_", "select_layers"]


def select_layers(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d / timm Attention modules the config names, in model order."""
    layers = _select(model, cfg.layers, cfg.exclude, what="quantized", types=QUANTIZABLE)
    linear_only = cfg.mode == Mode.DEPLOY
    for name, m in layers:
        if linear_only and isinstance(m, Attention) and (not _int8_static(cfg) or
                                                          cfg.softmax not in (SoftmaxQuant.NONE, SoftmaxQuant.UNIFORM)):
            raise ConfigError(f"'{name}': deployed attention matmuls are int8 with static per-tensor activations "
                              "(they export as QDQ): use w_bits 8, a_bits 8, a_granularity per_tensor, dtype int, "
                              "softmax uniform (or none: the probabilities stay float)")
        if linear_only and not isinstance(m, (nn.Linear, Attention)):
            raise ConfigError(f"'{name}' is {type(m).__name__}: deploy executes Linear layers and the attention "
                              "matmuls only (the patch embedding is simulate-only)")
        if cfg.group and not isinstance(m, Attention) and _fan_in(m) % cfg.group:
            raise ConfigError(f"group_size {cfg.group} does not divide {name}'s {_fan_in(m)} input features")
        if linear_only and cfg.deploy_kind == "weight_only" and cfg.w_bits == 4 and m.in_features % 2:
            raise ConfigError(f"int4 packs two codes a byte: {name}'s {m.in_features} input features must be even")
    if cfg.softmax != SoftmaxQuant.NONE and not any(isinstance(m, Attention) for _, m in layers):
        raise ConfigError("a softmax quantizer needs the attention matmuls: add attn_matmul to the layers")
    return layers


def _int8_static(cfg: QuantConfig) -> bool:
    return cfg.deploy_kind == "int8" and cfg.a_granularity == ActGranularity.PER_TENSOR


def _fan_in(m: nn.Module) -> int:
    return m.weight[0].numel()


def _weight_clip(w: torch.Tensor, cfg: QuantConfig, searched: float | None = None) -> float:
    """The clip ratio of the weight grid: searched by the mse observer or PTQ4ViT's search (``searched``), else 1
    (the absmax)."""
    if searched is not None:
        return searched
    return ops.mse_weight_clip(w, cfg.w_bits, cfg.group) if cfg.observer == Observer.MSE else 1.0


def _deployed(m: nn.Linear, cfg: QuantConfig, rng: dict[str, tuple[float, float]] | None,
              hessian: torch.Tensor | None, w_alpha: float | None = None) -> tuple[nn.Module, float]:
    """The deployed replacement of Linear ``m`` and its weight clip. rng None: an empty one to restore into."""
    kind, per_token = cfg.deploy_kind, cfg.a_granularity == ActGranularity.PER_TOKEN
    if kind.startswith("bnb_"):
        return to_bnb(m, kind[4:], blocksize=cfg.group_size), 1.0
    if rng is None:
        if kind == "int8":
            return Int8Linear(m.in_features, m.out_features, m.bias is not None, per_token, m.weight.device,
                              backend=cfg.backend, asym=not cfg.a_symmetric), 1.0
        if kind == "fp8":
            return Fp8Linear(m.in_features, m.out_features, m.bias is not None, per_token, m.weight.device,
                             cfg.backend), 1.0
        return WeightOnlyLinear(m.in_features, m.out_features, m.bias is not None, cfg.w_bits, cfg.group,
                                m.weight.device), 1.0
    absmax = max(abs(v) for v in rng[""]) if "" in rng else None
    if kind == "fp8":
        return Fp8Linear.from_linear(m, per_token=per_token, a_absmax=absmax, backend=cfg.backend), 1.0
    clip = _weight_clip(m.weight, cfg, w_alpha)
    if kind == "int8":
        static = None if cfg.a_symmetric or per_token or "" not in rng else rng[""]
        return Int8Linear.from_linear(m, per_token=per_token, a_absmax=absmax, a_range=static, clip=clip,
                                      backend=cfg.backend, asym=not cfg.a_symmetric), clip
    if hessian is not None:
        w, scale = ops.gptq_quantize(m.weight, hessian, cfg.w_bits, cfg.group, cfg.gptq_damp, act_order=cfg.act_order)
        return WeightOnlyLinear.from_linear(m, cfg.w_bits, cfg.group, weight=w, scale=scale), 1.0
    return WeightOnlyLinear.from_linear(m, cfg.w_bits, cfg.group, clip=clip), clip


def _round_weight_(m: nn.Module, cfg: QuantConfig, hessian: torch.Tensor | None, w_alpha: float | None = None,
                   ) -> float:
    """Simulate: put a Linear / Conv2d weight on its grid in place; returns the clip used."""
    w = m.weight.reshape(m.weight.shape[0], -1)
    if cfg.dtype == QuantDtype.FP8:
        new, clip = ops.fake_quant_fp8(w, ops.fp8_scale(w.detach().abs().amax(1, keepdim=True))), 1.0
    elif hessian is not None:
        new, clip = ops.gptq_quantize(w, hessian, cfg.w_bits, cfg.group, cfg.gptq_damp, act_order=cfg.act_order)[0], 1.0
    else:
        clip = _weight_clip(w, cfg, w_alpha)
        new = ops.fake_quant_weight(w, cfg.w_bits, cfg.group, clip)
    with torch.no_grad():
        m.weight.copy_(new.reshape(m.weight.shape))
    return clip


def dense_fallback_layers(layers: list[tuple[str, nn.Module]], cfg: QuantConfig) -> list[str]:
    """The Linear layers that ``cfg.dense_fallback``'s GEMM table measured faster in bf16 than quantized, at
    ``cfg.dense_fallback_rows`` rows: they stay bf16."""
    if cfg.dense_fallback is None:
        return []
    table, op = table_for(cfg.dense_fallback), "fp8" if cfg.dtype == QuantDtype.FP8 else "int8"
    return [n for n, m in layers if isinstance(m, nn.Linear) and
            dense_faster(table, op, cfg.dense_fallback_rows, m.out_features, m.in_features)]


def rebuild_quantized(model: nn.Module, cfg: QuantConfig, state: dict[str, Any]) -> None:
    """The quantized layers' structure (grids, scales and weights are loaded afterwards)."""
    if cfg.w_bits is None and cfg.a_bits is None:
        return
    per_token, fp8 = cfg.a_granularity == ActGranularity.PER_TOKEN, cfg.dtype == QuantDtype.FP8
    kept = set(state.get("kept_dense") or [])
    layers = [(n, m) for n, m in select_layers(model, cfg) if n not in kept]
    gelus = post_gelu_layers(model, layers, str(cfg.post_gelu))
    for name, m in layers:
        if cfg.mode == Mode.DEPLOY and isinstance(m, Attention):
            convert(m, cfg.a_bits, per_token, fp8, str(cfg.softmax))
            deploy_attention_(m)
        elif cfg.mode == Mode.DEPLOY:
            replace_module(model, name, _deployed(m, cfg, None, None)[0])
        else:
            convert(m, cfg.a_bits, per_token, fp8, str(cfg.softmax), str(cfg.post_gelu) if name in gelus else "uniform")


@register_transform(QuantConfig, rebuild=rebuild_quantized)
def quantize_(model: nn.Module, cfg: QuantConfig, ctx: TransformContext) -> dict[str, Any]:
    """Quantize the selected layers in place; calibrates on ``ctx.calib`` (train-split images) when needed."""
    layers = select_layers(model, cfg)
    kept = dense_fallback_layers(layers, cfg)
    layers = [(n, m) for n, m in layers if n not in kept]
    if cfg.w_bits is None and cfg.a_bits is None:
        return {"layers": [], "calibrated": 0}
    deploy, per_token, fp8 = cfg.mode == Mode.DEPLOY, cfg.a_granularity == ActGranularity.PER_TOKEN, \
        cfg.dtype == QuantDtype.FP8
    reparam: list[str] = []
    if cfg.needs_calibration and ctx.calib is None:
        raise ConfigError("static activation ranges and gptq need calibration images (--calib-data)")
    if cfg.reparam != Reparam.NONE:
        reparam = (repq_reparam_ if cfg.reparam == Reparam.REPQ else smoothquant_reparam_)(model, cfg, ctx.calib)
    float_model = copy.deepcopy(model) if cfg.rounding in BRECQS else None  # the blocks' targets
    for _, m in layers:  # attention is observed (in float) through its quantized class during calibration
        if isinstance(m, Attention):
            convert(m, cfg.a_bits, per_token, fp8, str(cfg.softmax))
    ranges, hessians = calibrate(model, layers, cfg, ctx.calib) if cfg.needs_calibration else ({}, {})
    sequential = cfg.rounding == Rounding.GPTQ and cfg.gptq_sequential
    gelus = post_gelu_layers(model, layers, str(cfg.post_gelu))
    searched = search_scales(model, layers, cfg, ctx.calib, ranges, gelus) if cfg.observer in SEARCHED else {}
    alpha = {n: a["w_alpha"] for n, a in searched.items()}
    clips = {}
    for name, m in tracked(layers, len(layers), "quantize (layers)"):
        if deploy and isinstance(m, Attention):  # static symmetric grids on the matmuls' inputs; exported as QDQ
            set_symmetric_grids(m, ranges.get(name, {}))
            deploy_attention_(m)
            continue
        if deploy:  # earlier layers are already deployed, so a sequential Hessian sees their quantized outputs
            h = layer_hessian(model, m, ctx.calib, cfg.calib_size) if sequential and cfg.w_bits is not None and \
                not isinstance(m, Attention) else hessians.get(name)
            new, clips[name] = _deployed(m, cfg, ranges.get(name, {}), h, alpha.get(name))
            replace_module(model, name, new)
            continue
        if cfg.w_bits is not None and not isinstance(m, Attention):
            # sequential GPTQ (the reference): this layer's Hessian from the inputs that the already-quantized
            # earlier layers produce, not from the float model's
            h = layer_hessian(model, m, ctx.calib, cfg.calib_size) if sequential else hessians.get(name)
            clips[name] = _round_weight_(m, cfg, h, alpha.get(name))
        if not isinstance(m, Attention):
            convert(m, cfg.a_bits, per_token, fp8, post_gelu=str(cfg.post_gelu) if name in gelus else "uniform")
        set_grids(m, ranges.get(name, {}))
    recon = {}
    if float_model is not None:
        run = brecq_ if cfg.rounding == Rounding.BRECQ else reconstruct_blocks_
        recon = run(model, float_model, clips, int(cfg.w_bits), cfg.group, ctx.calib,  # type: ignore[arg-type]
                    cfg.calib_size, cfg.recon_iters, **({"fisher": cfg.recon_fisher} if run is brecq_ else {}))
    return {"layers": [n for n, _ in layers], "calibrated": len(ranges), "deployable": deploy,
            **({"reconstruction": recon} if recon else {}),
            "deploy_kind": cfg.deploy_kind if deploy else None, "reparam": reparam,
            **({"kept_dense": kept} if cfg.dense_fallback else {}),
            "weight_clip": {n: c for n, c in clips.items() if c != 1.0},
            **({"scale_search": searched} if searched else {})}

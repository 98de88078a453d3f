"""Simulated (fake) quantization modules: accuracy-only, they run in floating point.

Each keeps the module it replaces (weights, state-dict keys, submodules) and only switches its class:

- :class:`FakeQuantLinear` / :class:`FakeQuantConv2d`: the input is fake-quantized (weights were rounded in
  place by the transform). Buffers a_scale, a_zero: the static per-tensor input grid.
- :class:`QuantAttention`: a timm ``Attention`` whose matmul inputs q, k, v are fake-quantized like any
  activation and whose softmax output goes through a softmax quantizer (uniform, log2, logsqrt2). Buffers
  qkv_scale [3], qkv_zero [3], p_scale []. The forward is rebuilt from timm's own submodules
  (:func:`vitcompress.methods.attn.attention`), so token merging stacks on it.

Activations use the integer grid (asymmetric, ``a_bits``) or float8 e4m3 (``fp8``: symmetric, scale =
absmax / 448); static per tensor (calibrated) or dynamic per token (per sample for the patch embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn

from ...errors import ConfigError
from ..attention import attention
from . import ops

QUANTIZABLE = (nn.Linear, nn.Conv2d, Attention)  # what a quantization layer pattern may select


class _ActQuant:
    """Mixin: fake-quantize a tensor with the grid the module was converted with."""

    _vc_compressed = True
    _vc_simulated_grid = True  # fake-quantized: training or re-sparsifying would break its grids (recovery refuses)
    _vc_a_bits: int | None
    _vc_per_token: bool
    _vc_fp8: bool
    _vc_ste = False  # straight-through gradients (rounding's own gradient is 0): set on gradient twins
    _vc_lsq = False  # straight-through rounding with the scale's gradient: set during block reconstruction
    _vc_act_off = False  # activations left in floating point (BRECQ's first stage reconstructs weights alone)
    _vc_export_refusal = "simulated quantization (an accuracy study) has no deployed form: export needs --mode deploy"

    def gradient_twin(self) -> nn.Module:
        """An attack's twin of this layer: itself, with straight-through rounding (its own gradient is 0)."""
        self._vc_ste = True
        return self

    def _fq(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """x [..., C]: per-token over the last dim, else the static (scale, zero)."""
        if self._vc_a_bits is None or self._vc_act_off:
            return x
        if self._vc_per_token:
            out = ops.fake_quant_fp8_per_token(x) if self._vc_fp8 else ops.fake_quant_act_per_token(x, self._vc_a_bits)
        elif self._vc_lsq:  # block reconstruction learns the step size: the gradient reaches the scale
            return ops.fake_quant_act(x, scale, zero, self._vc_a_bits, ste=True)
        else:
            out = ops.fake_quant_fp8(x, scale) if self._vc_fp8 else ops.fake_quant_act(x, scale, zero, self._vc_a_bits)
        return self._straight_through(x, out)

    def _straight_through(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + (out - x).detach() if self._vc_ste else out


class FakeQuantLinear(_ActQuant, nn.Linear):
    """``nn.Linear`` x [..., in] -> [..., out] whose input is fake-quantized; a post-GELU input (fc2) may take a
    post-GELU grid (``_vc_post_gelu``): PTQ4ViT's twin uniform (buffers a_neg_scale, the negative range's step, and
    a_scale, the positive one's) or AdaLog's shifted log grid (a_scale, its top; a_param, its codes per octave)."""

    _vc_post_gelu = "uniform"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vc_act_off:
            xq = x
        elif self._vc_post_gelu == "twin":
            xq = self._straight_through(x, ops.twin_gelu(x, self._vc_a_bits, self.a_neg_scale, self.a_scale))
        elif self._vc_post_gelu == "adalog":
            xq = self._straight_through(x, ops.adalog_gelu(x, self._vc_a_bits, self.a_scale, self.a_param))
        else:
            xq = self._fq(x, self.a_scale, self.a_zero)
        return F.linear(xq, self.weight, self.bias)


class FakeQuantConv2d(_ActQuant, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) x [B,C,H,W] whose input is fake-quantized; per token = per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vc_per_token:
            x = self._fq(x.flatten(1), self.a_scale, self.a_zero).reshape(x.shape)
        else:
            x = self._fq(x, self.a_scale, self.a_zero)
        return self._conv_forward(x, self.weight, self.bias)


class QuantAttention(_ActQuant, Attention):
    """timm ``Attention`` x [B,N,C] -> [B,N,C] with quantized matmul inputs and softmax output."""

    _vc_softmax: str
    _vc_observer: Callable[[str, torch.Tensor], None] | None = None
    _vc_deployed = False  # deploy mode (int8, static): exports as QDQ around the matmuls (torch runs it simulated)
    _vc_qdq = False  # the export copy: written with the exporter's fake-quant ops

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("quantized attention does not take attention masks")
        return attention(self, x)[0]

    def _vc_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   ) -> torch.Tensor:
        """q, k, v [B,H,N,Dh], bias [B,1,1,N] or None -> softmax(q k^T * scale + bias) v [B,H,N,Dh]."""
        if self._vc_qdq:
            return self._qdq_attend(q, k, v, bias)
        observe = self._vc_observer
        if observe is not None:  # calibration: record the float tensors
            observe("q", q)
            observe("k", k)
            observe("v", v)
        else:
            q, k, v = (self._fq(t, self.qkv_scale[i], self.qkv_zero[i]) for i, t in enumerate((q, k, v)))
        logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.float()
        p = logits.softmax(-1)
        if observe is not None:
            observe("p", p)
        elif self._vc_softmax != "none" and not self._vc_act_off:
            scale = p.amax(-1, keepdim=True) if self._vc_per_token else self.p_scale
            param = getattr(self, "p_param", None)  # adalog's base / twin's range ratio, searched in calibration
            p = self._straight_through(p, ops.fake_quant_softmax(p, scale, self._vc_a_bits, self._vc_softmax, param))
        p = self.attn_drop(p)
        return (p @ v.float()).to(v.dtype)

    def export_form(self, form: Any) -> nn.Module:
        """Deployed int8 attention matmuls (static per-tensor grids): the same function written with
        ``fake_quantize_per_tensor_affine``, which the ONNX exporter turns into QuantizeLinear / DequantizeLinear on
        q, k, v and the probabilities, so that OpenVINO and ONNX Runtime run q k^T and A V as int8 MatMuls."""
        if not self._vc_deployed:
            raise ConfigError(self._vc_export_refusal)
        self._vc_qdq = True
        return self

    def _qdq_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    ) -> torch.Tensor:
        """The export form of the quantized attention (8-bit, static): unsigned codes with zero points for q, k,
        v (their grids), [0, 255] over [0, p_scale] for the probabilities; the softmax scale applied after q k^T
        (the matmul's inputs stay the quantized tensors, the pattern runtimes fuse)."""
        top, half = 2**self._vc_a_bits - 1, 2 ** (self._vc_a_bits - 1)
        # unsigned codes round(x / s + z) on [0, top] are the signed codes round(x / s + z - half) on [-half,
        # half - 1]: deployed grids are symmetric (z = half), so zero points 0, which OpenVINO's int8 MatMul takes
        q, k, v = (torch.fake_quantize_per_tensor_affine(t.float(), float(self.qkv_scale[i]),
                                                         int(round(float(self.qkv_zero[i]))) - half, -half, half - 1)
                   for i, t in enumerate((q, k, v)))
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            logits = logits + bias.float()
        p = logits.softmax(-1)
        if self._vc_softmax != "none":
            p = torch.fake_quantize_per_tensor_affine(p, float(self.p_scale) / top, 0, 0, top)
        return p @ v


def convert(module: nn.Module, a_bits: int | None, per_token: bool, fp8: bool, softmax: str = "none",
            post_gelu: str = "uniform") -> None:
    """Switch ``module`` (Linear, Conv2d or timm Attention) to its fake-quant class, in place, with unit grids;
    post_gelu: a Linear's input takes that post-GELU grid (twin or adalog)."""
    dev = next(module.parameters()).device
    if isinstance(module, Attention):
        if type(module) not in (Attention, QuantAttention):  # another transform's attention (sparse, ...)
            raise ConfigError(f"cannot quantize {type(module).__name__}: quantize the attention matmuls before "
                              "changing the attention, or leave attn_matmul out")
        module.__class__ = QuantAttention
        module._vc_softmax = softmax
        module.register_buffer("qkv_scale", torch.ones(3, device=dev))
        module.register_buffer("qkv_zero", torch.zeros(3, device=dev))
        module.register_buffer("p_scale", torch.ones((), device=dev))
        if softmax in ops.SOFTMAX_SEARCH:  # only these quantizers have a searched parameter (state-dict key)
            module.register_buffer("p_param", torch.tensor(ops.SOFTMAX_SEARCH[softmax][0], device=dev))
    else:
        module.__class__ = FakeQuantConv2d if isinstance(module, nn.Conv2d) else FakeQuantLinear
        module.register_buffer("a_scale", torch.ones((), device=dev))
        module.register_buffer("a_zero", torch.zeros((), device=dev))
        if post_gelu != "uniform":
            module._vc_post_gelu = post_gelu
            extra = "a_neg_scale" if post_gelu == "twin" else "a_param"
            module.register_buffer(extra, torch.ones((), device=dev))
    module._vc_a_bits, module._vc_per_token, module._vc_fp8 = a_bits, per_token, fp8


def set_symmetric_grids(module: QuantAttention, ranges: dict[str, tuple[float, float]]) -> None:
    """A deployed attention's grids: q, k, v symmetric about 0 (step absmax / (2^(b-1) - 1), zero point exactly
    2^(b-1) on the unsigned codes, i.e. signed codes without a zero point: OpenVINO runs q k^T in int8 only so);
    the probabilities on [0, their max]."""
    half = 2 ** (module._vc_a_bits - 1)
    with torch.no_grad():
        for i, key in enumerate("qkv"):
            if key in ranges:
                absmax = max(abs(ranges[key][0]), abs(ranges[key][1]), ops.EPS)
                module.qkv_scale[i], module.qkv_zero[i] = absmax / (half - 1), float(half)
        if "p" in ranges:
            module.p_scale.fill_(max(ranges["p"][1], ops.EPS))


def deploy_attention_(module: QuantAttention) -> None:
    """Mark a calibrated quantized attention as deployed: its int8 matmuls export as QDQ (torch runs it simulated)."""
    module._vc_deployed = True
    module._vc_export_refusal = None  # the instance's: it has an export form
    module._vc_simulated_grid = False  # no weights of its own (its Linears are deployed)


def post_gelu_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], post_gelu: str) -> set[str]:
    """The selected Linear layers whose input is a GELU's output (timm Mlp's fc2), unless ``post_gelu`` is uniform."""
    if post_gelu == "uniform":
        return set()
    out = set()
    for name, m in layers:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(m, nn.Linear) and getattr(parent, "fc2", None) is m and isinstance(getattr(parent, "act", None),
                                                                                       nn.GELU):
            out.add(name)
    return out


def act_grid(lo: float, hi: float, bits: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of a static grid covering [lo, hi]: asymmetric integer, or symmetric e4m3 (zero 0)."""
    if fp8:
        return ops.fp8_scale(torch.tensor(max(abs(lo), abs(hi)))), torch.zeros(())
    return ops.act_qparams(torch.tensor(lo), torch.tensor(hi), bits)


def set_grids(module: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    """Write calibrated ranges into a converted module's buffers: keys '' (the input) or q, k, v, p."""
    bits, fp8 = module._vc_a_bits, module._vc_fp8
    with torch.no_grad():
        if isinstance(module, QuantAttention):
            for i, key in enumerate("qkv"):
                if key in ranges:
                    s, z = act_grid(*ranges[key], bits, fp8)
                    module.qkv_scale[i], module.qkv_zero[i] = s, z
            if "p" in ranges:
                module.p_scale.fill_(max(ranges["p"][1], ops.EPS))
            if "p_param" in ranges and hasattr(module, "p_param"):
                module.p_param.fill_(ranges["p_param"][0])
        elif "" in ranges and getattr(module, "_vc_post_gelu", "uniform") != "uniform":
            kind = module._vc_post_gelu
            param = ranges.get("gelu_param", (1.0 if kind == "twin" else 2.0,) * 2)[0]
            for buf, v in ops.post_gelu_grid(kind, bits, *ranges[""], param).items():
                getattr(module, buf).fill_(v)
        elif "" in ranges:
            s, z = act_grid(*ranges[""], bits, fp8)
            module.a_scale.copy_(s)
            module.a_zero.copy_(z)

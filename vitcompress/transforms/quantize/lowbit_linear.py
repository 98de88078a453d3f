"""Deployable low-bit Linears besides W8A8 int8: weight-only int8/int4 (for size) and FP8 e4m3 W8A8.

- :class:`WeightOnlyLinear`: symmetric int8 or int4 codes per output channel or per group of input
  channels; int4 codes are packed two per byte. The forward dequantizes the weight to the input's dtype and
  runs a dense GEMM, so it saves memory and disk, not time.
- :class:`Fp8Linear`: float8 e4m3 weights (per-channel scale) and activations (per-token dynamic or static
  per-tensor scale), multiplied by ``torch._scaled_mm`` (Hopper / Ada GPUs, and the CPU), with a
  dequantize-then-matmul fallback where it cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...kernels._triton import runs_kernel
from ...kernels.fp8_gemm import fp8_gemm, scaled_mm_rowwise
from . import ops
from .int8_linear import ScaledLinear, TwinLinear
from .qdq import QdqForm, qdq_linear


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [O, I] in [-8, 7] (I even) -> uint8 [O, I/2]: low nibble = even column, high = odd."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> int8 codes [O, I] (inverse of :func:`pack_int4`)."""
    lo, hi = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)


class WeightOnlyLinear(nn.Module):
    """x [..., in] -> [..., out]; weights stored as int8 (bits 8) or packed int4 (bits 4) codes.

    Buffers: w_codes int8 [out, in] or uint8 [out, in/2], w_scale float32 [out, groups] (groups = 1 per
    channel). Parameter: bias [out] or None.
    """

    _vc_compressed = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int | None = None, device: torch.device | str | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only deploy stores 8- or 4-bit codes, got {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packing needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size if group_size else 1
        shape, dtype = ((out_features, in_features), torch.int8) if bits == 8 else \
            ((out_features, in_features // 2), torch.uint8)
        self.register_buffer("w_codes", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()  # the codes and scales are buffers: no autograd history from the float weight
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None, clip: float = 1.0,
                    weight: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> WeightOnlyLinear:
        """Round ``linear``'s weight to the symmetric grid, or store ``weight`` (e.g. GPTQ's) on its ``scale``
        ([O,1] or [O,G,1]) exactly."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                  linear.weight.device)
        w = linear.weight if weight is None else weight
        scale = ops.weight_scale(w, bits, group_size, clip) if scale is None else scale
        codes = ops.weight_codes(w, scale, bits)
        mod.w_codes.copy_(codes if bits == 8 else pack_int4(codes))
        mod.w_scale.copy_(scale.reshape(linear.out_features, -1))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().float())
        return mod

    def codes(self) -> torch.Tensor:
        """int8 codes [out, in]."""
        return self.w_codes if self.bits == 8 else unpack_int4(self.w_codes)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 weight [out, in]."""
        scale = self.w_scale[..., None] if self.group_size else self.w_scale
        return ops.weight_dequant(self.codes(), scale)

    def gradient_twin(self) -> nn.Module:
        """Weight-only: the dequantized weights, float activations (what the deployed GEMM computes)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.dequantized_weight().float())
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach().float())
        return lin

    def export_form(self, form: QdqForm) -> nn.Module:
        """The ONNX form: per-channel int8 weights as QDQ (int4 and groups have none in ONNX Runtime / OpenVINO)."""
        if self.bits != 8 or self.group_size:
            raise ConfigError(f"int{self.bits}" + (f" in groups of {self.group_size}" if self.group_size else "")
                              + ": only per-channel int8 weights export")
        return qdq_linear(self.codes(), self.w_scale[:, 0], self.bias, None, form)

    def extra_repr(self) -> str:
        grid = f"group {self.group_size}" if self.group_size else "per channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} {grid}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Fp8Linear(ScaledLinear):
    """x [..., in] -> [..., out] in x's dtype, as an e4m3 x e4m3 GEMM with fp32 accumulation.

    Buffers: w_fp8 float8_e4m3fn [out, in], w_scale float32 [out], a_scale float32 [] (static per tensor;
    unused per token). Parameter: bias [out] or None.
    """

    _vc_export_refusal = "fp8: ONNX Runtime and OpenVINO have no fp8 GEMM on a CPU; export int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_token: bool = True,
                 device: torch.device | str | None = None, backend: str = "auto"):
        super().__init__(in_features, out_features, bias, per_token, device, backend)
        self.register_buffer("w_fp8", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                  device=device))

    @classmethod
    @torch.no_grad()  # the codes and scales are buffers: no autograd history from the float weight
    def from_linear(cls, linear: nn.Linear, *, per_token: bool = True, a_absmax: float | None = None,
                    backend: str = "auto") -> Fp8Linear:
        """backend: ``auto`` / ``torch`` (``torch._scaled_mm``) or ``triton`` (:mod:`vitcompress.kernels.fp8_gemm`)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, per_token, linear.weight.device,
                  backend)
        scale = ops.fp8_scale(linear.weight.detach().abs().amax(1, keepdim=True))  # [out, 1]
        mod.w_fp8.copy_(ops.fp8_codes(linear.weight.detach(), scale))
        mod.w_scale.copy_(scale[:, 0])
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().float())
        if a_absmax is not None:
            mod.a_scale.copy_(ops.fp8_scale(torch.tensor(a_absmax)))
        return mod

    def _codes(self) -> torch.Tensor:
        return self.w_fp8

    def gradient_twin(self) -> nn.Module:
        """The deployed function: e4m3 weights and e4m3 activations, straight-through gradients."""
        scaled_mm = self.backend != "triton" and self.uses_scaled_mm(self.w_fp8)  # its product comes back in bf16
        return TwinLinear(self.dequantized_weight(), self.bias, None if self.per_token else self.a_scale, "fp8",
                          bf16_product=scaled_mm)

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        """Whether torch._scaled_mm with row-wise scales runs here (CUDA capability >= 8.9 or a recent torch on
        the CPU), for K, N multiples of 16."""

        return not (self.in_features % 16 or self.out_features % 16) and scaled_mm_rowwise(str(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        s = ops.fp8_scale(x2.detach().abs().amax(1, keepdim=True)) if self.per_token else \
            self.a_scale.expand(x2.shape[0], 1)
        q = ops.fp8_codes(x2, s)
        # triton always; auto where the GEMM table measured our kernel faster than torch._scaled_mm at this shape
        if runs_kernel(self.backend, x, shape=("fp8", x2.shape[0], self.out_features, self.in_features)):

            out = fp8_gemm(q, self.w_fp8.t(), s[:, 0].contiguous(), self.w_scale, self.bias, out_dtype=torch.bfloat16,
                           backend="triton")
        else:
            if self.uses_scaled_mm(x):
                out = torch._scaled_mm(q, self.w_fp8.t(), scale_a=s.float().contiguous(),
                                       scale_b=self.w_scale[None, :].contiguous(), out_dtype=torch.bfloat16).float()
            else:
                out = (q.float() @ self.w_fp8.float().t()) * (s * self.w_scale)
            if self.bias is not None:
                out = out + self.bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

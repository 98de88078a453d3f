"""The export form of a deployed int8 layer: :class:`QDQLinear`, which the ONNX exporter writes as standard
QuantizeLinear / DequantizeLinear around a MatMul. The quantize family owns it; ``vitcompress.export`` only calls
each layer's ``export_form``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...config import StrEnum


class QdqActivations(StrEnum):
    INT8 = "int8"  # int8 codes (zero point a_zero - 128; 0 on the symmetric grid): what TensorRT takes
    UINT8 = "uint8"  # the same grid as uint8 codes (zero point a_zero): what ONNX Runtime's x86 kernels prefer


@dataclasses.dataclass(frozen=True)
class QdqForm:
    """How a deployed int8 layer is written as QDQ: the activations' type, and the weights' bits: 8, or 7 (codes on
    +-63 with twice the scale) for runtimes on CPUs without VNNI, whose u8 x s8 GEMM sums pairs in saturating int16
    (2 x 255 x 127 overflows it; 2 x 255 x 63 does not)."""

    activations: QdqActivations = QdqActivations.INT8
    weight_bits: int = 8


def halve_codes(codes: torch.Tensor, scale: torch.Tensor, up: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight codes [out, in] with scales [out] -> the same weights on the 7-bit grid: codes on +-63, scales x2.

    An even code halves exactly. An odd code 2k+1 lies between k and k+1 on the 7-bit grid, and only the float
    weight says which is nearer: ``up`` [out, in] bool (:func:`half_bits`) is whether it was above its 8-bit code.
    Without it (artifacts from before it was stored) the code rounds half to even, up to 0.75 of a 7-bit step off.
    """
    if up is None:
        half = torch.round(codes.float() / 2)
    else:
        half = torch.floor(codes.float() / 2) + ((codes.int() % 2 == 1) & up).float()
    return half.clamp(-63, 63).to(torch.int8), scale * 2


def half_bits(weight: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Whether each float weight [out, in] lies above its 8-bit code (scale [out, 1]), packed 8 to a byte along
    ``in``: uint8 [out, ceil(in / 8)], what :func:`halve_codes` needs to round the 7-bit codes from the floats."""
    return pack_bits(weight.float() / scale.float() > codes.float())


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in / 8)], bit j of byte i is column 8 i + j."""
    out, n = bits.shape
    padded = torch.zeros(out, -(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :n] = bits.to(torch.uint8)
    weights = (2 ** torch.arange(8, device=bits.device)).to(torch.uint8)
    return (padded.view(out, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`pack_bits` undone: uint8 [out, ceil(n / 8)] -> bool [out, n]."""
    shifts = torch.arange(8, device=packed.device)
    return ((packed[..., None].int() >> shifts) & 1).bool().flatten(1)[:, :n]


def qdq_linear(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor | None,
               form: QdqForm, up: torch.Tensor | None = None, a_zero: int = 128) -> QDQLinear:
    """The QDQ form of a layer with int8 weight codes [out, in] and scales [out] (onto 7 bits if asked; ``up``:
    see :func:`halve_codes`); ``a_zero``: the activations' zero point on the uint8 grid (128: symmetric)."""
    if form.weight_bits == 7:
        codes, scale = halve_codes(codes, scale, up)
    return QDQLinear(codes, scale, bias, a_scale, form.activations, a_zero)


class QDQLinear(nn.Module):
    """x [..., in] -> [..., out] as ONNX writes it: (optional) activation fake-quant per tensor, then a MatMul with
    the per-channel int8 weight. Buffers: weight_t float32 [in, out] (codes x scale, exact), w_scale [out],
    a_scale [] (absent for weight-only)."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 a_scale: torch.Tensor | None, act_dtype: QdqActivations, a_zero: int = 128):
        super().__init__()
        self.register_buffer("weight_t", (codes.float() * w_scale[:, None].float()).t().contiguous())
        self.register_buffer("w_scale", w_scale.float().clone())
        self.register_buffer("w_zero", torch.zeros_like(w_scale, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.a_scale = None if a_scale is None else float(a_scale)
        # the same grid either way: uint8 codes with zero point a_zero, or int8 codes with a_zero - 128
        self.a_zero, self.a_range = (a_zero, (0, 255)) if act_dtype == QdqActivations.UINT8 else \
            (a_zero - 128, (-128, 127))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_scale is not None:
            x = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, *self.a_range)
        w = torch.fake_quantize_per_channel_affine(self.weight_t, self.w_scale, self.w_zero, 1, -128, 127)
        out = torch.matmul(x, w)
        return out if self.bias is None else out + self.bias



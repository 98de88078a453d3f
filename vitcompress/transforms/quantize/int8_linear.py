"""W8A8 executed for real: int8 weights, int8 activations, an int32-accumulating GEMM (oneDNN on a CPU; Triton or
``torch._int_mm`` on CUDA).

y = (q(x) @ W_q^T) * s_x * s_w + b, with W_q int8 per output channel (symmetric) and q(x) int8, symmetric,
per token (computed on the fly) or per tensor (a calibrated static scale). The artifact stores the int8
weights, so it is about a quarter of the float size for these layers.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from ...device import onednn_int8_exact
from ...errors import ConfigError
from ...kernels._triton import runs_kernel
from ...kernels.int8_gemm import int8_gemm, int_mm, quantize_per_token
from . import ops
from .act_codes import QMAX, SYMMETRIC_ZERO, lowest_code, quantize_per_token_asym, row_grid, to_uint8, to_uint8_rows
from .qdq import QdqForm, half_bits, halve_codes, qdq_linear, unpack_bits
from .qdq import pack_bits as qdq_pack

# torch's CPU int8 engine (oneDNN: VNNI / AMX kernels, prepacked weights); torch._int_mm on a CPU is a slow
# reference loop (18x slower than fp32 on ViT-B), so backend auto on a CPU runs oneDNN wherever this torch has it,
# and backend torch the reference (the one kernel preference decides; see ``cpu_path``)
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
# Without VNNI / AMX, oneDNN's u8 x s8 GEMM adds adjacent products in saturating int16 (up to 2 x 255 x 127 = 64,770
# > 32,767: measured, outputs off by up to 1e5 on ViT-B shapes). There one side takes 7 bits, which keeps every pair
# sum inside int16 and the GEMM exact: the int8 weight codes are halved onto +-63 when they are packed
# (2 x 255 x 63 = 32,130). Chosen over 7-bit activations on held-out train images: the CIFAR-10 testbed's W8A8
# agreement with the float model was 98.7 % against 97.8 % (results/quant/cpu_avx2_emulated/int8_no_vnni_mode.json).
# The artifact stays the same.
ONEDNN_EXACT = onednn_int8_exact()
# Prepacked weights, outside the modules (an opaque oneDNN tensor must not reach deepcopy, state_dict or a traced
# graph): {(data_ptr, shape, version, 7-bit mode): (weakref to the int8 weight, packed, zero points, scales)}
_PACKED: dict[tuple, tuple] = {}

def _weight_key(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), tuple(w.shape), -1 if w.is_inference() else w._version)  # inference: no version counter


def _forget_packed(w: torch.Tensor | None) -> None:
    if w is not None:
        for key in [k for k in _PACKED if k[0] == w.data_ptr()]:
            del _PACKED[key]


def is_packed(w_int8: torch.Tensor) -> bool:
    """Whether the oneDNN path has packed these weight codes (it ran on them)."""
    return any(v[0]() is w_int8 for v in _PACKED.values())


def cpu_weight_codes(w_int8: torch.Tensor, w_scale: torch.Tensor, w_half: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight codes [out, in] int8 and scales [out] that oneDNN's int8 path multiplies on this CPU: the 8-bit
    ones, or, without VNNI, the 7-bit codes (rounded from the float weights through ``w_half``, the packed bits of
    :func:`~.qdq.half_bits`) with the scales doubled."""
    if ONEDNN_EXACT:
        return w_int8, w_scale
    return halve_codes(w_int8, w_scale, None if w_half is None else unpack_bits(w_half, w_int8.shape[1]))


def cpu_path(backend: str, x: torch.Tensor) -> bool:
    """Whether a W8A8 layer with kernel preference ``backend`` runs oneDNN's int8 linear on ``x``: on a CPU under
    ``auto`` where this torch has it (``torch`` runs the ``torch._int_mm`` reference)."""
    return x.device.type == "cpu" and backend == "auto" and HAS_ONEDNN


def packed_weight(w_int8: torch.Tensor, w_scale: torch.Tensor, w_half: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(oneDNN's prepacked weight, zero points [out], its per-channel scales [out], the scaled row sums of the codes
    it multiplies [out] (what a per-row activation zero point contributes)) for int8 codes [out, in]:
    packed once, again only when the weight changes. Without VNNI the codes are halved onto 7 bits. Cached by the
    weight's storage and version; an entry whose weight was freed is dropped (its address may be reused)."""
    key = (*_weight_key(w_int8), ONEDNN_EXACT)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is not None:
        return hit[1], hit[2], hit[3], hit[4]
    for k in [k for k, v in _PACKED.items() if v[0]() is None]:
        del _PACKED[k]
    w, scale = cpu_weight_codes(w_int8, w_scale, w_half)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    zeros = torch.zeros(w_int8.shape[0], dtype=torch.long)
    sums = w.sum(1, dtype=torch.int32).float() * scale
    _PACKED[key] = (weakref.ref(w_int8), packed, zeros, scale, sums)
    return packed, zeros, scale, sums


@torch.library.custom_op("vitcompress::onednn_int8_linear", mutates_args=())
def onednn_int8_linear(x2: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                       bias: torch.Tensor | None, per_token: bool, w_half: torch.Tensor | None = None,
                       a_zero: torch.Tensor | None = None, asym: bool = False) -> torch.Tensor:
    """The CPU int8 engine torch ships (oneDNN; VNNI / AMX where present): x2 [M, in] -> [M, out] in x2's dtype
    (fp32 or bf16), for int8 weight codes [out, in] with scales [out]. One opaque op, so that a compiled graph
    keeps it whole (its fake implementation gives the shape). oneDNN takes uint8 activations with a zero point:
    the int8 codes + 128 are the same grid (per token), or the static grid's own zero point ``a_zero``. A static
    scale ``a_scale`` [] and the bias go into oneDNN's
    epilogue; per-token scales are applied to its fp32 output. Without VNNI one side takes 7 bits (see
    ``ONEDNN_EXACT``)."""
    packed, zeros, ws, sums = packed_weight(w_int8, w_scale, w_half)
    qmax = QMAX
    if per_token and asym:  # oneDNN takes one zero point: 128, and each row's own adds (128 - z) x the row sums
        qx, s, z = to_uint8_rows(x2)
        out = torch.ops.onednn.qlinear_pointwise(qx, 1.0, SYMMETRIC_ZERO, packed, ws, zeros, None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        out.add_((SYMMETRIC_ZERO - z) * sums).mul_(s)
        return (out if bias is None else out.add_(bias)).to(x2.dtype)
    if per_token:
        qx, s = to_uint8(x2, None, qmax)
        out = torch.ops.onednn.qlinear_pointwise(qx, 1.0, qmax + 1, packed, ws, zeros, None, 1.0, 0,
                                                 torch.float32, "none", [], "").mul_(s)
        return (out if bias is None else out.add_(bias)).to(x2.dtype)
    a = float(a_scale)
    zero = SYMMETRIC_ZERO if a_zero is None else int(a_zero)  # inside the opaque op: no graph break
    qx, _ = to_uint8(x2, a, qmax, zero)
    out_dtype = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
    bias = None if bias is None else bias.to(out_dtype)
    return torch.ops.onednn.qlinear_pointwise(qx, a, zero, packed, ws, zeros, bias, 1.0, 0,
                                              out_dtype, "none", [], "").to(x2.dtype)


@onednn_int8_linear.register_fake
def _(x2, w_int8, w_scale, a_scale, bias, per_token, w_half=None, a_zero=None, asym=False):  # noqa: ANN001
    return x2.new_empty(x2.shape[0], w_int8.shape[0])


@register_flop_formula(torch.ops.vitcompress.onednn_int8_linear)
def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    """2 * M * K * N for x2 [M, K] and weight codes [N, K]."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


if HAS_ONEDNN:
    @register_flop_formula(torch.ops.onednn.qlinear_pointwise)
    def _qlinear_flops(qx_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        """2 * M * K * N for qx [M, K] -> out [M, N] (the prepacked weight's shape is opaque)."""
        return 2 * qx_shape[0] * qx_shape[-1] * out_shape[-1]


class TwinLinear(nn.Module):
    """A deployed low-precision Linear as a differentiable function: x [..., in] -> [..., out] =
    linear(round(x), weight) + bias, where ``round`` is the layer's activation quantizer (``int`` on +-qmax, or
    ``fp8`` e4m3; per token when ``a_scale`` is None, else that static scale) in the forward pass and the identity in
    the backward pass (straight-through), and ``weight`` [out, in] is what the deployed GEMM multiplies by."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor | None, kind: str,
                 qmax: int = QMAX, bf16_product: bool = False, a_zero: int | None = None, asym_rows: bool = False):
        super().__init__()
        self.bf16_product = bf16_product  # the deployed GEMM returns its product in bf16 (torch._scaled_mm)
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("a_scale", None if a_scale is None else a_scale.detach().float().clone())
        # a_zero: a static uint8 grid's zero point; asym_rows: per token, each row on its own uint8 grid
        self.kind, self.qmax, self.a_zero, self.asym_rows = kind, qmax, a_zero, asym_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kind == "int" and self.a_scale is None and self.asym_rows:
            s, z = row_grid(x.reshape(-1, x.shape[-1]))
            s, z = s.reshape(*x.shape[:-1], 1), z.reshape(*x.shape[:-1], 1)
            rounded = (torch.round(x / s) + z).clamp(0, 255).sub(z) * s
        elif self.kind == "int":
            s = x.abs().amax(-1, keepdim=True).clamp_min(ops.EPS) / self.qmax if self.a_scale is None else \
                self.a_scale
            if self.a_zero is None:
                rounded = torch.round(x / s).clamp(-self.qmax, self.qmax) * s
            else:
                z = self.a_zero
                rounded = (torch.round(x / s) + z).clamp(lowest_code(z), 255).sub(z) * s
        else:
            s = ops.fp8_scale(x.abs().amax(-1, keepdim=True)) if self.a_scale is None else self.a_scale
            rounded = ops.fp8_codes(x, s).float() * s
        x = x + (rounded - x).detach()  # straight through
        out = x @ self.weight.t()
        if self.bf16_product:
            out = out + (out.bfloat16().float() - out).detach()
        return out if self.bias is None else out + self.bias


class ScaledLinear(nn.Module):
    """Base of the W8A8 drop-ins: x [..., in] -> [..., out], low-precision weights with a per-channel scale.

    Buffers: w_scale float32 [out], a_scale float32 [] (static per-tensor activations; unused per token);
    the subclass registers its weight buffer. Parameter: bias [out] or None. backend: auto, torch or triton.
    """

    _vc_compressed = True

    def __init__(self, in_features: int, out_features: int, bias: bool, per_token: bool,
                 device: torch.device | str | None, backend: str):
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got '{backend}'")
        self.in_features, self.out_features, self.per_token = in_features, out_features, per_token
        self.backend = backend
        self.register_buffer("w_scale", torch.ones(out_features, device=device))
        self.register_buffer("a_scale", torch.ones((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] the codes stand for (a gradient twin's weight; see robustness)."""
        return self._codes().float() * self.w_scale[:, None]

    def _codes(self) -> torch.Tensor:
        raise NotImplementedError

    def gradient_twin(self) -> nn.Module:
        """The function this layer computes where it runs, differentiable (an attack's gradient twin): the same
        weights and the same activation rounding, with straight-through gradients."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={'per_token' if self.per_token else 'per_tensor'}, backend={self.backend}")


class Int8Linear(ScaledLinear):
    """Drop-in for ``nn.Linear``: x [..., in] -> [..., out] in x's dtype.

    Buffers: w_int8 int8 [out, in] (row-major, so the GEMM's [in, out] operand ``w_int8.t()`` is column-major:
    the layout cuBLASLt's int8 GEMM and Hopper's 8-bit wgmma want), w_half uint8 [out, ceil(in / 8)] (one bit
    per weight: which way its 7-bit code rounds, for CPUs without VNNI), w_scale float32 [out], a_scale float32
    [] and a_zero int32 [] (static per-tensor activations: codes round(x / a_scale) + a_zero on [0, 255], the
    asymmetric uint8 grid; a_zero 128 is the symmetric one of artifacts from before it; unused per token).
    Parameter: bias [out] or None.
    """

    # absent from older artifacts, rebuilt on load: w_half (before 2026-12-05) from the codes, a_zero (before
    # 2026-12-08) as the symmetric grid they ran
    _vc_derived_buffers = ("w_half", "a_zero")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_token: bool = True,
                 device: torch.device | str | None = None, backend: str = "auto", asym: bool = False):
        super().__init__(in_features, out_features, bias, per_token, device, backend)
        self.asym = asym  # per token: each row on its own uint8 grid (the config's a_symmetric false, v7)
        self.register_buffer("w_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_half", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("a_zero", torch.tensor(SYMMETRIC_ZERO, dtype=torch.int32, device=device))

    def _codes(self) -> torch.Tensor:
        return self.w_int8

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        old = state_dict.pop(prefix + "w_qt", None)  # artifacts from before 2026-11-22 stored [in, out]
        if old is not None:
            state_dict[prefix + "w_int8"] = old.t().contiguous()
        codes = state_dict.get(prefix + "w_int8")
        if codes is not None and prefix + "w_half" not in state_dict:  # before 2026-12-05: round half to even
            even = torch.round(codes.float() / 2) > torch.floor(codes.float() / 2)
            state_dict[prefix + "w_half"] = qdq_pack(even)
        if codes is not None and prefix + "a_zero" not in state_dict:  # before 2026-12-08: the symmetric grid
            state_dict[prefix + "a_zero"] = torch.tensor(SYMMETRIC_ZERO, dtype=torch.int32)
        _forget_packed(getattr(self, "w_int8", None))  # new weights: repack on the next call
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    @torch.no_grad()  # the codes and scales are buffers: no autograd history from the float weight
    def from_linear(cls, linear: nn.Linear, *, per_token: bool = True, a_absmax: float | None = None,
                    clip: float = 1.0, backend: str = "auto", a_range: tuple[float, float] | None = None,
                    asym: bool = False) -> Int8Linear:
        """Quantize ``linear``'s weight per output channel. Static activations: ``a_range`` (lo, hi) sets the
        asymmetric uint8 grid (scale (hi - lo) / 255, lo and hi widened to hold 0 exactly), or ``a_absmax`` the
        symmetric one. Per token, ``asym`` puts each row on its own uint8 grid (else symmetric, +-127).

        backend: ``triton`` (the fused int8 GEMM of :mod:`vitcompress.kernels.int8_gemm`), ``torch``
        (``torch._int_mm``), or ``auto`` (on CUDA, whichever of the two the per-architecture GEMM table measured
        faster at each shape: :mod:`vitcompress.kernels.tuned`; on a CPU, oneDNN's int8 linear).
        """
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, per_token, linear.weight.device,
                  backend, asym=asym)
        scale = ops.weight_scale(linear.weight, 8, clip=clip)  # [out, 1]
        mod.w_int8.copy_(ops.weight_codes(linear.weight, scale, 8))
        mod.w_half.copy_(half_bits(linear.weight, scale, mod.w_int8))
        mod.w_scale.copy_(scale[:, 0])
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().float())
        if a_range is not None:  # the same grid a per-token row gets from its own range
            a_scale, a_zero = row_grid(torch.tensor([[float(a_range[0]), float(a_range[1])]]))
            mod.a_scale.fill_(float(a_scale))
            mod.a_zero.fill_(int(a_zero))
        elif a_absmax is not None:
            mod.a_scale.fill_(max(a_absmax, ops.EPS) / QMAX)
        return mod

    def _row_sums(self) -> torch.Tensor:
        """The weight codes' row sums times their scales [out]: what one activation code's shift adds to each output."""
        return self.w_int8.sum(1, dtype=torch.int32).float() * self.w_scale

    def _static_bias(self) -> torch.Tensor | None:
        """The bias of the int8 GEMM's float epilogue on the static grid: codes - 128 run as int8, so the layer's
        bias gains a_scale * w_scale * (128 - a_zero) * (the weight codes' row sums) [out] (0 on the symmetric
        grid)."""
        extra = self._row_sums() * ((SYMMETRIC_ZERO - self.a_zero) * self.a_scale)  # + 0.0 is exact when symmetric
        return extra if self.bias is None else self.bias + extra

    def gradient_twin(self) -> nn.Module:
        """The deployed function (see :meth:`ScaledLinear.gradient_twin`): on a CPU without VNNI, the 7-bit weights
        that the oneDNN path runs."""
        w, scale = self.w_int8, self.w_scale
        if cpu_path(self.backend, self.w_int8):
            w, scale = cpu_weight_codes(w, scale, self.w_half)
        a_scale = None if self.per_token else self.a_scale
        return TwinLinear(w.float() * scale[:, None].float(), self.bias, a_scale, "int", QMAX,
                          a_zero=None if self.per_token else int(self.a_zero), asym_rows=self.per_token and self.asym)

    def export_form(self, form: QdqForm) -> nn.Module:
        """The ONNX form: a :class:`QDQLinear` with the same codes (per-token activations have none)."""
        if self.per_token:
            raise ConfigError("it quantizes activations per token on the fly, which has no static QDQ form: "
                              "quantize with --a-granularity per_tensor (calibrated)")
        return qdq_linear(self.w_int8, self.w_scale, self.bias, self.a_scale, form,
                          unpack_bits(self.w_half, self.in_features), int(self.a_zero))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # auto: our kernel only where the GEMM table measured it faster than torch._int_mm at this shape
        kernel = runs_kernel(self.backend, x, shape=("int8", x2.shape[0], self.out_features, self.in_features))
        if not kernel and cpu_path(self.backend, x):
            out = torch.ops.vitcompress.onednn_int8_linear(x2, self.w_int8, self.w_scale, self.a_scale, self.bias,
                                                           self.per_token, self.w_half, self.a_zero,
                                                           self.per_token and self.asym)
            return out.reshape(*shape[:-1], self.out_features)
        rows = None  # per token on asymmetric grids: each row's (128 - zero point) x scale [M]
        if self.per_token and self.asym:
            q, s, z = quantize_per_token_asym(x2)
            rows = (QMAX + 1 - z) * s
        elif self.per_token:  # codes int8 [M, in], scales fp32 [M]: the Triton kernel or its torch reference (which
            # a compiled graph fuses into the LayerNorm / GELU before it, so it takes the reference there)
            fused = kernel and not torch.compiler.is_compiling()
            q, s = quantize_per_token(x2, backend="triton" if fused else "torch")
        else:  # the static uint8 grid's codes - 128, as int8; the zero point's share goes into the bias
            s = self.a_scale.expand(x2.shape[0])
            z = self.a_zero  # tensor ops only (a compiled graph must not read it back): lowest code 1 when symmetric
            low = (z == SYMMETRIC_ZERO).float()
            q = torch.maximum((torch.round(x2.float() / self.a_scale) + z).clamp(max=255), low)
            q = q.sub(QMAX + 1).to(torch.int8)
        bias = self.bias if self.per_token else self._static_bias()
        if kernel:
            out = int8_gemm(q, self.w_int8.t(), s.contiguous(), self.w_scale, bias, out_dtype=x.dtype,
                            backend="triton")
            if rows is not None:
                out = (out.float() + rows[:, None] * self._row_sums()).to(x.dtype)
            return out.reshape(*shape[:-1], self.out_features)
        acc = int_mm(q, self.w_int8.t())
        out = acc.float() * (s[:, None] * self.w_scale)
        if rows is not None:
            out = out + rows[:, None] * self._row_sums()
        if bias is not None:
            out = out + bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

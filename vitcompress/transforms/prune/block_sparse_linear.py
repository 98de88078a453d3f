"""``BlockSparseLinear``: a drop-in ``nn.Linear`` whose weight is stored block-sparse (BSR, BxB blocks).

Storage (the artifact keeps exactly this): ``values`` [nnzb, B, B] (trainable), ``crow_indices``
[out/B + 1] and ``col_indices`` [nnzb] (int64 buffers), ``bias`` [out] or None.

Execution (``backend``): ``torch`` runs the fastest CPU implementation measured for the layer's shape,
``dense`` (the blocks scattered into a dense weight, one GEMM in the input dtype; cached at inference) or
``bsr`` (``torch.sparse`` BSR matmul, fp32 only on the CPU). ``triton`` runs
:func:`vitcompress.kernels.bsr_gemm.bsr_gemm` (inference; training steps use dense-masked, which has a
backward). ``auto`` picks triton on CUDA when it is installed, torch otherwise.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...kernels._triton import Backend, runs_kernel
from ...kernels.bsr_gemm import bsr_dense, bsr_gemm

CPU_IMPLS = ("dense", "bsr")
BACKENDS = (Backend.AUTO, Backend.TORCH, Backend.TRITON)


def block_mask(weight: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """The ``keep`` BxB tiles of ``weight`` [out, in] with the largest L2 norm, as a bool [out/B, in/B]."""
    o, i = weight.shape
    norms = weight.detach().float().reshape(o // block, block, i // block, block).pow(2).sum((1, 3))
    mask = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
    mask[norms.flatten().topk(keep).indices] = True
    return mask.reshape(norms.shape)


class BlockSparseLinear(nn.Module):
    """x [..., in] -> [..., out], with ``nnzb`` nonzero BxB weight blocks."""

    _vc_compressed = True
    export_note = "block-sparse layers export as dense (masked) weights: ONNX has no block-sparse GEMM"

    def export_form(self, form: object) -> nn.Module:
        """The ONNX form: a dense ``nn.Linear`` holding the masked weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight(torch.float32))
            if self.bias is not None:
                lin.bias.copy_(self.bias.float())
        return lin

    def gradient_twin(self) -> nn.Module:
        """An attack's twin: itself on the dense CPU path (the sparse one has no autograd)."""
        self.cpu_impl = "dense"
        return self

    def __init__(self, in_features: int, out_features: int, block_size: int, nnzb: int, bias: bool = True,
                 backend: str = "auto", cpu_impl: str = "dense", device: torch.device | str | None = None):
        super().__init__()
        if in_features % block_size or out_features % block_size:
            raise ConfigError(f"block size {block_size} does not divide the {out_features}x{in_features} weight")
        if backend not in BACKENDS or cpu_impl not in CPU_IMPLS:
            raise ConfigError(f"backend must be one of {BACKENDS} and cpu_impl one of {CPU_IMPLS}")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.backend, self.cpu_impl = backend, cpu_impl
        self.values = nn.Parameter(torch.zeros(nnzb, block_size, block_size, device=device))
        self.register_buffer("crow_indices", torch.zeros(out_features // block_size + 1, dtype=torch.long,
                                                         device=device))
        self.register_buffer("col_indices", torch.zeros(nnzb, dtype=torch.long, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mask: torch.Tensor | None = None, block_sparsity: float | None = None,
                    block_size: int = 32, backend: str = "auto") -> BlockSparseLinear:
        """Keep the blocks in ``mask`` (bool [out/B, in/B]), or the largest-norm ``1 - block_sparsity`` of them."""
        o, i = linear.out_features, linear.in_features
        if (mask is None) == (block_sparsity is None):
            raise ConfigError("give exactly one of mask and block_sparsity")
        if o % block_size or i % block_size:
            raise ConfigError(f"block size {block_size} does not divide the {o}x{i} weight")
        if mask is None:
            if not 0 <= block_sparsity < 1:
                raise ConfigError(f"block_sparsity must be in [0, 1), got {block_sparsity}")
            n = (o // block_size) * (i // block_size)
            mask = block_mask(linear.weight, block_size, max(1, round((1 - block_sparsity) * n)))
        if tuple(mask.shape) != (o // block_size, i // block_size):
            raise ConfigError(f"mask shape {tuple(mask.shape)} != {(o // block_size, i // block_size)}")
        mod = cls(i, o, block_size, int(mask.sum()), linear.bias is not None, backend, device=linear.weight.device)
        with torch.no_grad():
            rows, cols = mask.nonzero(as_tuple=True)
            b = block_size
            w = linear.weight.detach().reshape(o // b, b, i // b, b)
            mod.values.copy_(w[rows, :, cols, :])
            counts = mask.sum(1)
            mod.crow_indices.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
            mod.col_indices.copy_(cols)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def density(self) -> float:
        return self.values.shape[0] * self.block_size**2 / (self.in_features * self.out_features)

    def mask(self) -> torch.Tensor:
        """bool [out/B, in/B]: which blocks are stored."""
        b = self.block_size
        rows = torch.repeat_interleave(torch.arange(self.out_features // b, device=self.col_indices.device),
                                       self.crow_indices.diff())
        m = torch.zeros(self.out_features // b, self.in_features // b, dtype=torch.bool, device=rows.device)
        m[rows, self.col_indices] = True
        return m

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] with zeros outside the stored blocks (differentiable in ``values``)."""

        vals = self.values if dtype is None else self.values.to(dtype)
        return bsr_dense(self.crow_indices, self.col_indices, vals, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.density:.3f}, backend={self.backend}, cpu_impl={self.cpu_impl}")

    def _cached_dense(self, dtype: torch.dtype) -> torch.Tensor:
        # compiled: the scatter is part of the graph (a frozen graph folds it into a constant weight)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and self.values.requires_grad):
            return self.dense_weight(dtype)
        try:
            key = (self.values._version, self.values.data_ptr(), dtype, self.values.device)
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return self.dense_weight(dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.dense_weight(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        training = torch.is_grad_enabled() and self.values.requires_grad

        # the kernel has no backward (training uses dense-masked) and takes B in 16..128 (auto falls back)
        kernel_block = self.backend == "triton" or self.block_size in (16, 32, 64, 128)
        if runs_kernel(self.backend, x) and not training and kernel_block:

            y = bsr_gemm(x.reshape(-1, self.in_features).to(dtype), self.crow_indices, self.col_indices,
                         self.values, self.bias, self.out_features, backend="triton")
            return y.reshape(*x.shape[:-1], self.out_features)
        sparse_ok = not torch.compiler.is_compiling()  # torch.sparse tensors do not trace: compiled runs dense
        if self.cpu_impl == "bsr" and sparse_ok and not x.is_cuda and not (torch.is_grad_enabled()
                                                                            and self.values.requires_grad):
            with warnings.catch_warnings():  # "BSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                w = torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values.detach().float(),
                                            (self.out_features, self.in_features), check_invariants=False)
            with torch.autocast(x.device.type, enabled=False):
                x2 = x.reshape(-1, self.in_features).float()
                y = (w @ x2.t()).t()
                if self.bias is not None:
                    y = y + self.bias.float()
            return y.to(dtype).reshape(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self._cached_dense(dtype), bias)


def choose_cpu_impl(mod: BlockSparseLinear, tokens: int, dtype: torch.dtype, repeat: int = 5) -> dict[str, float]:
    """Time each CPU implementation on an input of ``tokens`` rows; set ``mod.cpu_impl`` to the fastest.

    Returns the median milliseconds per implementation.
    """
    x = torch.randn(tokens, mod.in_features)
    times = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for impl in CPU_IMPLS:
            mod.cpu_impl = impl
            mod(x)
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                mod(x)
                samples.append((time.perf_counter() - t0) * 1e3)
            times[impl] = sorted(samples)[len(samples) // 2]
    mod.cpu_impl = min(times, key=times.get)
    return times

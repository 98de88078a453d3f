"""Static and one-shot measurements: FLOPs (attention included), peak memory, serialized size."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from .. import kernels  # noqa: F401  (defines torch.ops.vitcompress and their FLOP formulas)
from ..artifact import WEIGHTS_METADATA, weight_tensors
from .timing import BenchConfig, Dtype, attention_backend, model_runner


def _register_gemms() -> None:
    """Teach the FLOP counter the ops it does not count out of the box: ``aten._int_mm`` (int8), a
    non-decomposed ``aten.linear``, the CPU flash attention of torch < 2.12 and bitsandbytes' int8 and 4-bit
    GEMM / GEMV custom ops. Our kernels' custom ops register their formulas beside their definitions."""

    def rows(shape) -> int:
        return int(torch.Size(shape[:-1]).numel())

    def add(op, formula) -> None:
        if op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(formula)

    add(torch.ops.aten._int_mm, lambda a, b, *args, out_shape=None, **kw: 2 * a[0] * a[1] * b[1])
    add(torch.ops.aten.linear, lambda x, w, *args, out_shape=None, **kw: 2 * rows(x) * x[-1] * w[0])
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        add(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    bnb = getattr(torch.ops, "bitsandbytes", None)  # its ops exist once bitsandbytes is imported
    for name in ("int8_linear_matmul", "int8_scaled_mm", "int8_mixed_scaled_mm"):  # B / CB: [N, K]
        if bnb is not None and hasattr(bnb, name):
            weight = 2 if name == "int8_mixed_scaled_mm" else 1
            add(getattr(bnb, name), lambda *a, w=weight, out_shape=None, **kw: 2 * rows(a[0]) * a[0][-1] * a[w][0])
    for name in ("gemm_4bit", "gemv_4bit"):  # shapeB: [N, K]
        if bnb is not None and hasattr(bnb, name):
            add(getattr(bnb, name), lambda a, b, shape_b, *args, out_shape=None, **kw: 2 * rows(a) * a[-1] * shape_b[0])


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs (2 x MACs) of one image's forward, counted by ``torch.utils.flop_counter``.

    Counted in fp32 with SDPA on, so fused attention kernels are included (and int8 GEMMs).
    """
    _register_gemms()
    device = next(model.parameters()).device
    x = torch.randn(1, *input_size, device=device)
    # the counter's module tracker hooks the gradients of tensors that require them; under inference mode an
    # expanded Parameter (an attention pool's latent query) then has none and it fails: count without them
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), attention_backend(model, True):
            model.eval()(x)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


def serialized_size_mb(model: nn.Module) -> float:
    """Bytes of the model's state dict as the artifact stores it (safetensors), in MiB."""
    return len(save(weight_tensors(model), metadata=WEIGHTS_METADATA)) / 2**20


def state_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++-level stderr (the profiler's kineto chatter) for the duration."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def peak_alloc_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """High-water mark of memory allocated *during* ``fn()`` above what was live before it, in bytes.

    CUDA: ``max_memory_allocated`` after a reset, minus what was allocated at the start. CPU: replays the
    profiler's allocation events in time order. None when the CPU profiler is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        with _quiet_stderr(), contextlib.redirect_stdout(io.StringIO()), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except Exception:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_mb(model: nn.Module, batch_size: int, input_size: tuple[int, ...], cfg: BenchConfig) -> float | None:
    """Peak memory of one inference batch in MiB: weights + the high-water mark of live allocations."""
    run = model_runner(model, batch_size, input_size, cfg)
    run()  # warm: one-time allocations (compile, caches) are not the steady state
    extra = peak_alloc_bytes(run, cfg.resolve_device())
    return None if extra is None else (state_bytes(model) + extra) / 2**20


def train_step_peak_mb(model: nn.Module, params: list[nn.Parameter], batch_size: int, input_size: tuple[int, ...],
                       cfg: BenchConfig) -> float | None:
    """Peak memory of the first AdamW training step (forward, backward, optimizer state) updating ``params``,
    with the other parameters frozen, in MiB: weights + the step's high-water mark."""
    device = cfg.resolve_device()
    model = model.to(device).train()
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    x = torch.randn(batch_size, *input_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        dtype = cfg.dtype.on(device)
        with torch.autocast(device.type, dtype=dtype.torch, enabled=dtype != Dtype.FP32):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        extra = peak_alloc_bytes(step, device)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.eval()
    return None if extra is None else (state_bytes(model) + extra) / 2**20

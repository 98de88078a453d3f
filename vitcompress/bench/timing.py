"""Latency measurement: warm up, repeat, report median and p95; A-vs-B side by side, alternating.

CUDA events on a GPU, ``time.perf_counter`` on a CPU. By default a model runs the way a user would run
the dense baseline: bf16 autocast with timm's fused SDPA attention; ``compile=True`` runs the compiled deploy
path (:mod:`vitcompress.bench.compiled`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import Config, StrEnum
from ..device import cpu_flags, resolve_device
from ..errors import ConfigError
from ..io import atomic_write_json, cache_dir
from ..provenance import device_name
from .compiled import CompileMode, compile_model


class Dtype(StrEnum):
    """The autocast dtype. ``auto``: bf16 on CUDA; on a CPU, the faster dense dtype measured on this machine
    (:func:`fastest_cpu_dtype`: fp32 without native bf16, where an emulated bf16 matmul is ~50x slower)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    def on(self, device: torch.device, model: nn.Module | None = None, example: torch.Tensor | None = None) -> Dtype:
        """The concrete dtype on ``device`` (``auto`` resolved). Given the model and an example batch, ``auto`` on a
        CPU is what :func:`model_dtype` measured for that model at that batch shape (cached per machine)."""
        if self != Dtype.AUTO:
            return self
        if device.type == "cuda":
            return Dtype.BF16
        if model is not None and example is not None:
            return model_dtype(model, example)
        return fastest_cpu_dtype()

    @property
    def torch(self) -> torch.dtype:
        if self == Dtype.AUTO:
            raise ValueError("resolve Dtype.AUTO for a device first (Dtype.on)")
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


@functools.cache
def fastest_cpu_dtype() -> Dtype:
    """bf16 or fp32, whichever runs a ViT-B-sized Linear ([1024, 768] x [768, 3072]) faster on this CPU, measured
    once per process (median of 5 after a warm-up); bf16 must win by 10 %, since fp32 is also exact. Without native
    bf16 the answer is fp32 without measuring. ``VITCOMPRESS_CPU_DTYPE=bf16|fp32`` overrides it."""
    forced = os.environ.get("VITCOMPRESS_CPU_DTYPE")
    if forced:
        return Dtype(forced)
    if not cpu_has_native_bf16():
        return Dtype.FP32
    lin, x = torch.nn.Linear(768, 3072), torch.randn(1024, 768)

    def median_s(bf16: bool) -> float:
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(7):
                t = time.perf_counter()
                lin(x)
                if i >= 2:
                    times.append(time.perf_counter() - t)
        return statistics.median(times)

    return Dtype.BF16 if median_s(True) * 1.1 < median_s(False) else Dtype.FP32


def model_signature(model: nn.Module) -> str:
    """A short hash of the model's structure (module classes, parameter and buffer names, shapes and dtypes):
    what its speed depends on, not its weights."""
    parts = [type(m).__name__ for m in model.modules()]
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in (*model.named_parameters(), *model.named_buffers())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


_MODEL_DTYPES: dict[str, Dtype] = {}


def model_dtype(model: nn.Module, example: torch.Tensor) -> Dtype:
    """``auto`` on a CPU for this model at this batch shape: bf16 where it runs the model at least 10 % faster than
    fp32 (alternating timings, median of 3 after a warm-up), else fp32. Measured once per machine, torch version,
    thread count, model structure and input shape, and cached in ``$VITCOMPRESS_CACHE/auto_dtype.json``, so that
    the dtype of an accuracy figure does not flip between runs. Without native bf16: fp32, unmeasured;
    ``VITCOMPRESS_CPU_DTYPE`` overrides; under torch.distributed a cached answer is used, else the probe of
    :func:`fastest_cpu_dtype` (ranks must agree without timing each other)."""
    forced = os.environ.get("VITCOMPRESS_CPU_DTYPE")
    if forced:
        return Dtype(forced)
    if not cpu_has_native_bf16():
        return Dtype.FP32
    key = f"{device_name(torch.device('cpu'))}|torch {torch.__version__}|{model_signature(model)}|" \
          f"{tuple(example.shape)}"
    if key in _MODEL_DTYPES:
        return _MODEL_DTYPES[key]
    path = cache_dir() / "auto_dtype.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached and torch.distributed.is_available() and torch.distributed.is_initialized():
        return fastest_cpu_dtype()  # ranks must agree without timing each other: a cached answer, else the probe
    if key not in cached:
        cached[key] = str(_measure_dtype(model, example))
        with contextlib.suppress(OSError):  # a read-only cache: measured again next time, never an error
            atomic_write_json(path, cached)
    _MODEL_DTYPES[key] = Dtype(cached[key])
    return _MODEL_DTYPES[key]


def _measure_dtype(model: nn.Module, x: torch.Tensor) -> Dtype:
    def run(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
        return time.perf_counter() - t

    was_training = model.training
    model.eval()
    try:
        run(True), run(False)
        fp32, bf16 = [], []
        for _ in range(3):
            bf16.append(run(True))
            fp32.append(run(False))
    finally:
        model.train(was_training)
    return Dtype.BF16 if statistics.median(bf16) * 1.1 < statistics.median(fp32) else Dtype.FP32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo's flags)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclasses.dataclass
class BenchConfig(Config):
    """How to run and time a model. device: ``auto`` (cuda if present), ``cpu``, ``cuda``, ``cuda:N``.

    compile: the compiled deploy path (:mod:`vitcompress.bench.compiled`: fullgraph, frozen weights, a CUDA graph
    per batch size on a GPU), compiled as ``compile_mode`` says."""

    NAME = "bench"
    VERSION = 1
    device: str = "auto"
    dtype: Dtype = Dtype.AUTO
    sdpa: bool = True
    compile: bool = False
    compile_mode: CompileMode = CompileMode.DEFAULT
    warmup: int = 3
    warmup_s: float = 1.0
    repeat: int = 15
    batch_sizes: tuple[int, ...] = (1, 16, 64)

    def validate(self) -> None:
        if self.warmup < 0 or self.warmup_s < 0 or self.repeat < 1:
            raise ConfigError(f"warmup and warmup_s must be >= 0 and repeat >= 1 "
                              f"(got {self.warmup}, {self.warmup_s}, {self.repeat})")
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got '{self.device}'")

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclasses.dataclass
class Timing:
    """Per-call latencies in milliseconds."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95_ms(self) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]

    def summary(self, batch_size: int | None = None) -> dict[str, float]:
        out = {"median_ms": round(self.median_ms, 4), "p95_ms": round(self.p95_ms, 4), "n": len(self.samples_ms)}
        if batch_size:
            out["throughput"] = round(batch_size / (self.median_ms / 1000.0), 2)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def warm_up(fns: list[Callable[[], object]], device: torch.device, warmup: int, warmup_s: float) -> None:
    """Call each of ``fns`` at least ``warmup`` times and until ``warmup_s`` seconds have passed.

    A few calls are not enough on a CPU: allocator growth and oneDNN's first-call work made the first
    15 timed calls of a small ViT 2-3x slower than steady state here.
    """
    t0, done = time.perf_counter(), 0
    while done < warmup or time.perf_counter() - t0 < warmup_s:
        for fn in fns:
            fn()
        _sync(device)
        done += 1


def time_callable(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3,
                  warmup_s: float = 0.0, repeat: int = 15) -> Timing:
    """Warm ``fn`` up (see :func:`warm_up`), then time ``repeat`` calls."""
    device = torch.device(device)
    warm_up([fn], device, warmup, warmup_s)
    return Timing([_timed(fn, device) for _ in range(repeat)])


@contextlib.contextmanager
def attention_backend(model: nn.Module, sdpa: bool) -> Iterator[None]:
    """Temporarily switch every timm attention module to fused SDPA (or the manual path)."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    old = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = sdpa
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.fused_attn = o


def model_runner(model: nn.Module, batch_size: int, input_size: tuple[int, ...], cfg: BenchConfig,
                 images: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one inference batch under ``cfg``.

    The model is moved to ``cfg``'s device and its timm attention modules are set to ``cfg.sdpa``;
    input is [batch_size, *input_size]: random, or the first of ``images`` [n,*input_size] (cycled), which
    models whose work depends on the content (adaptive token counts) need.
    """
    device = cfg.resolve_device()
    model = model.to(device).eval()
    if getattr(model, "_vc_stateful", False):
        return _stream_runner(model, batch_size, input_size, cfg, device)
    fwd = compile_model(model, device, cfg.compile_mode) if cfg.compile else model
    if images is None:
        x = torch.randn(batch_size, *input_size, device=device)
    else:
        x = images[torch.arange(batch_size) % len(images)].to(device)
    dtype = cfg.dtype.on(device, model, x)
    use_amp = dtype != Dtype.FP32
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]

    def run() -> torch.Tensor:
        for m in attn:
            m.fused_attn = cfg.sdpa
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype.torch, enabled=use_amp):
            return fwd(x)

    run.dtype = dtype  # type: ignore[attr-defined]  # what ran: auto resolved for this model and batch
    return run


def _stream_runner(model: nn.Module, batch_size: int, input_size: tuple[int, ...], cfg: BenchConfig,
                   device: torch.device) -> Callable[[], torch.Tensor]:
    """A stateful (Eventful) model's runner: each call is the next frame of ``batch_size`` streams, cycling through 8
    random frames, so that every token changes between calls (a top-k gate's cost; a threshold gate's worst case).
    Repeating one frame would time a frozen video, which re-processes nothing."""
    frames = torch.randn(8, batch_size, *input_size, device=device)
    dtype = cfg.dtype.on(device, model, frames.transpose(0, 1))  # timed on whole clips, each call from a reset
    use_amp = dtype != Dtype.FP32
    model.reset()  # type: ignore[operator]
    stream = itertools.cycle(frames)

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype.torch, enabled=use_amp):
            return model(next(stream))

    run.dtype = dtype  # type: ignore[attr-defined]
    return run


def time_model(model: nn.Module, input_size: tuple[int, ...], cfg: BenchConfig,
               batch_sizes: tuple[int, ...] | None = None) -> dict[str, dict[str, float]]:
    """Latency per batch size: ``{"16": {"median_ms", "p95_ms", "n", "throughput", "dtype"}, ...}``."""
    out = {}
    for bs in batch_sizes or cfg.batch_sizes:
        run = model_runner(model, bs, input_size, cfg)
        out[str(bs)] = {**time_callable(run, device=cfg.resolve_device(), warmup=cfg.warmup, warmup_s=cfg.warmup_s,
                                        repeat=cfg.repeat).summary(bs), "dtype": str(run.dtype)}
    return out


def compare(fn_a: Callable[[], object], fn_b: Callable[[], object], *, device: torch.device | str = "cpu",
            warmup: int = 3, warmup_s: float = 0.0, repeat: int = 15) -> dict[str, float]:
    """Time A and B alternately in one process (AB, BA, AB, ...: drift hits both equally).

    Returns medians, p95s and ``speedup`` = median(A) / median(B): > 1 means B is faster.
    """
    device = torch.device(device)
    warm_up([fn_a, fn_b], device, warmup, warmup_s)
    a, b = [], []
    for i in range(repeat):
        if i % 2 == 0:
            a.append(_timed(fn_a, device))
            b.append(_timed(fn_b, device))
        else:
            b.append(_timed(fn_b, device))
            a.append(_timed(fn_a, device))
    ta, tb = Timing(a), Timing(b)
    return {"a_median_ms": ta.median_ms, "a_p95_ms": ta.p95_ms, "b_median_ms": tb.median_ms,
            "b_p95_ms": tb.p95_ms, "speedup": ta.median_ms / tb.median_ms}

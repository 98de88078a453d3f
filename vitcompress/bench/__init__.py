"""The benchmark harness shared by eval, sweeps and every method's speed claims."""

from .compiled import CompileMode, compile_model, compile_options, static_shapes
from .measure import count_flops, peak_memory_mb, serialized_size_mb
from .timing import BenchConfig, Dtype, Timing, compare, model_runner, time_callable, time_model

__all__ = ["BenchConfig", "CompileMode", "Dtype", "Timing", "compare", "compile_model", "compile_options",
           "count_flops", "model_runner", "peak_memory_mb", "serialized_size_mb", "static_shapes", "time_callable",
           "time_model"]

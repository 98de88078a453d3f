"""The benchmark harness shared by eval, sweeps and every method's speed claims."""

from .measure import count_flops, peak_memory_mb, serialized_size_mb
from .timing import BenchConfig, Dtype, Timing, compare, model_runner, time_callable, time_model

__all__ = ["BenchConfig", "Dtype", "Timing", "compare", "count_flops", "model_runner", "peak_memory_mb",
           "serialized_size_mb", "time_callable", "time_model"]

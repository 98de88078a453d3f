import math

import pytest
import torch
from conftest import TINY

from vitcompress import create_model, data_config
from vitcompress.bench import BenchConfig, compare, count_flops, peak_memory_mb, time_callable, time_model
from vitcompress.bench.measure import serialized_size_mb, state_bytes
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.evaluate import accuracy_metrics, evaluate

FAST = BenchConfig(batch_sizes=(1, 4), warmup=1, warmup_s=0.0, repeat=3)
KEYS = {"top1", "top5", "agreement", "kl", "latency_ms", "throughput", "peak_mem_mb", "params", "gflops",
        "size_mb", "device", "dtype", "versions", "n_images"}


def test_accuracy_metrics_by_hand():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [0, 0, 0, 0, 0, 5.0]])
    labels = torch.tensor([0, 2, 1])
    m = accuracy_metrics(logits, labels, logits)
    assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == pytest.approx(200 / 3)
    assert m["agreement"] == 100.0 and m["kl"] == pytest.approx(0.0, abs=1e-7)
    other = logits.clone()
    other[1] = torch.tensor([0, 4.0, 5, 0, 0, 0])
    m = accuracy_metrics(other, labels, logits)
    assert m["agreement"] == pytest.approx(200 / 3) and m["kl"] > 0
    none = accuracy_metrics(logits, torch.full((3,), -1), None)
    assert none["top1"] is None and none["agreement"] is None


def test_eval_of_a_trained_artifact(trained_artifact):
    model = create_model(str(trained_artifact))
    result = evaluate(model, load_data("digits", data_config(model), limit=100), bench=FAST)
    assert set(result) >= KEYS
    assert result["agreement"] == 100.0 and result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["reference"] == "self"
    assert set(result["latency_ms"]) == {"1", "4"} and result["latency_ms"]["4"]["p95"] >= \
        result["latency_ms"]["4"]["median"] > 0
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["size_mb"] == pytest.approx((trained_artifact / "model.safetensors").stat().st_size / 2**20, rel=1e-6)
    assert result["dtype"] in ("bf16", "fp32") and result["versions"]["torch"] == torch.__version__


def test_eval_reports_every_corruption(trained_artifact):
    model = create_model(str(trained_artifact))
    result = evaluate(model, load_data("digits-c", data_config(model), limit=120), speed=False)
    assert len(result["groups"]) == 6
    assert sum(g["n_images"] for g in result["groups"].values()) == result["n_images"] == 120
    mean = sum(g["top1"] * g["n_images"] for g in result["groups"].values()) / 120
    assert mean == pytest.approx(result["top1"])


def test_eval_against_another_reference_and_without_labels(tiny_model):
    other = create_model("vit_tiny_patch16_224", **TINY)
    data = load_data("synthetic:16", data_config(tiny_model))
    result = evaluate(tiny_model, data, reference=other, speed=False)
    assert result["top1"] is None and result["top5"] is None
    assert result["kl"] > 0
    with torch.inference_mode():  # agreement is the share of equal top-1s: recomputed here
        x = torch.cat([b[0] for b in data.loader(16)])
        same = (tiny_model.eval()(x).argmax(-1) == other.eval()(x).argmax(-1)).float().mean().item() * 100
    assert result["agreement"] == pytest.approx(same)
    assert evaluate(tiny_model, data, reference=None, speed=False)["agreement"] is None


def test_flop_count_includes_attention(tiny_model):
    n, d, p, depth, classes = 16 + 1, 64, 8, 2, 10
    per_block = 2 * n * d * (3 * d + d + 8 * d) + 2 * 2 * n * n * d
    expected = 2 * 16 * (3 * p * p) * d + depth * per_block + 2 * d * classes
    assert count_flops(tiny_model, (3, 32, 32)) == expected


def test_timing_harness():
    t = time_callable(lambda: sum(range(1000)), warmup=1, repeat=7)
    assert len(t.samples_ms) == 7 and t.p95_ms >= t.median_ms > 0
    r = compare(lambda: sum(range(20000)), lambda: sum(range(100)), warmup=1, repeat=6)
    assert r["speedup"] > 1 and math.isfinite(r["a_p95_ms"])


def test_time_model_and_memory(tiny_model):
    lat = time_model(tiny_model, (3, 32, 32), FAST)
    assert set(lat) == {"1", "4"} and lat["4"]["throughput"] > 0
    peak = peak_memory_mb(tiny_model, 8, (3, 32, 32), FAST)
    assert peak is not None and peak * 2**20 > state_bytes(tiny_model)
    assert serialized_size_mb(tiny_model) * 2**20 > state_bytes(tiny_model)


def test_bench_config_validation():
    with pytest.raises(ConfigError, match="batch sizes must be >= 1"):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        BenchConfig(dtype="int3")
    assert BenchConfig.from_dict(BenchConfig(dtype="fp32").to_dict()).dtype == "fp32"


def test_auto_dtype_on_a_cpu_is_the_measured_fastest_dense_dtype(monkeypatch):
    import torch

    from vitcompress.bench import timing

    timing.fastest_cpu_dtype.cache_clear()
    monkeypatch.setattr(timing, "cpu_has_native_bf16", lambda: False)  # emulated bf16: fp32, without measuring
    assert timing.Dtype.AUTO.on(torch.device("cpu")) == timing.Dtype.FP32
    timing.fastest_cpu_dtype.cache_clear()
    monkeypatch.setenv("VITCOMPRESS_CPU_DTYPE", "bf16")
    assert timing.Dtype.AUTO.on(torch.device("cpu")) == timing.Dtype.BF16
    timing.fastest_cpu_dtype.cache_clear()
    monkeypatch.delenv("VITCOMPRESS_CPU_DTYPE")
    monkeypatch.setattr(timing, "cpu_has_native_bf16", lambda: True)
    assert timing.fastest_cpu_dtype() in (timing.Dtype.BF16, timing.Dtype.FP32)  # measured
    timing.fastest_cpu_dtype.cache_clear()


def test_auto_dtype_is_measured_on_the_model_at_its_batch_and_cached(monkeypatch, tmp_path):
    """auto times the model it will run at the batch shape it will run, once per machine: the dtype of an accuracy
    figure does not depend on a later timing run."""
    import torch

    from vitcompress.bench import timing

    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.delenv("VITCOMPRESS_CPU_DTYPE", raising=False)
    monkeypatch.setattr(timing, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(timing, "_MODEL_DTYPES", {})
    calls = []
    monkeypatch.setattr(timing, "_measure_dtype", lambda m, x: calls.append(tuple(x.shape)) or timing.Dtype.FP32)
    model = create_model("vit_tiny_patch16_224", **TINY)
    x1, x8 = torch.zeros(1, 3, 32, 32), torch.zeros(8, 3, 32, 32)
    assert timing.Dtype.AUTO.on(torch.device("cpu"), model, x1) == timing.Dtype.FP32
    assert timing.Dtype.AUTO.on(torch.device("cpu"), model, x1) == timing.Dtype.FP32
    assert timing.Dtype.AUTO.on(torch.device("cpu"), model, x8) == timing.Dtype.FP32
    assert calls == [(1, 3, 32, 32), (8, 3, 32, 32)]  # once per batch shape
    monkeypatch.setattr(timing, "_MODEL_DTYPES", {})  # a new process: read back from the cache file
    assert timing.Dtype.AUTO.on(torch.device("cpu"), model, x1) == timing.Dtype.FP32 and len(calls) == 2
    assert "auto_dtype.json" in {p.name for p in tmp_path.iterdir()}
    assert timing.Dtype.BF16.on(torch.device("cpu"), model, x1) == timing.Dtype.BF16  # a given dtype wins


def test_eval_records_the_dtype_that_ran_and_it_is_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path))
    model = create_model("vit_tiny_patch16_224", **TINY)
    data = load_data("digits", data_config(model), limit=16)
    bench = BenchConfig(device="cpu", batch_sizes=(1, 4), repeat=1, warmup=0, warmup_s=0)
    runs = [evaluate(model, data, reference=None, batch_size=8, bench=bench) for _ in range(2)]
    assert runs[0]["dtype"] == runs[1]["dtype"] in ("bf16", "fp32")
    assert {r["latency_ms"]["1"]["dtype"] for r in runs} <= {"bf16", "fp32"}
    assert [r["latency_ms"]["4"]["dtype"] for r in runs][0] == runs[1]["latency_ms"]["4"]["dtype"]

"""What the runtimes really execute: OpenVINO's compiled (runtime) model of a tiny W8A8 export, layer by layer.
A quantized Linear that OpenVINO runs in f32 means the QDQ placement does not match what it fuses (#42): fail."""

from __future__ import annotations

from collections import Counter

import pytest

from vitcompress.export import ExportConfig, export_model
from vitcompress.pipeline import apply_stack

ov = pytest.importorskip("openvino")


def _runtime_layers(path) -> Counter:
    """(layer type, runtime precision) -> count, of OpenVINO's compiled CPU model."""
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
    out: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        out[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    return out


@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_every_quantized_linear_runs_in_int8_in_openvino(tiny_model, tmp_path, a_dtype):
    n_linear = 4 * len(tiny_model.blocks)  # qkv, proj, fc1, fc2 per block; the head stays float
    apply_stack(tiny_model, [{"name": "quantize", "mode": "deploy"}])
    path = tmp_path / "m.onnx"
    export_model(tiny_model, path, ExportConfig(qdq_activations=a_dtype))
    layers = _runtime_layers(path)
    int8 = layers[("FullyConnected", "i8")] + layers[("FullyConnected", "u8")]
    assert int8 == n_linear, layers
    assert layers[("FullyConnected", "f32")] == 1, layers  # the classifier head only


def test_a_float_export_runs_in_f32(tiny_model, tmp_path):
    path = tmp_path / "m.onnx"
    export_model(tiny_model, path, ExportConfig())
    layers = _runtime_layers(path)
    assert layers[("FullyConnected", "f32")] == 4 * len(tiny_model.blocks) + 1
    assert not any(p in ("i8", "u8") for (t, p) in layers if t == "FullyConnected")

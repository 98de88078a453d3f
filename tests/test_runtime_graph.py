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


ATTN = {"name": "quantize", "mode": "deploy", "layers": ["qkv", "proj", "fc1", "fc2", "attn_matmul"],
        "softmax": "uniform"}


def _matmuls_on_dequantized(proto) -> int:
    """MatMul nodes whose two inputs both come from DequantizeLinear (or a Transpose of one): int8 matmuls."""
    made = {o: n for n in proto.graph.node for o in n.output}

    def dq(name: str) -> bool:
        n = made.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape"):
            n = made.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear"

    return sum(1 for n in proto.graph.node if n.op_type == "MatMul" and dq(n.input[0]) and dq(n.input[1]))


def test_deployed_attention_matmuls_export_as_int8_qdq_and_match_torch(tiny_model, tmp_path):
    """attn_matmul in deploy mode: q k^T and A V take QDQ inputs (static 8-bit grids, the probabilities on [0, 255]),
    and ONNX Runtime computes what torch computes (the attention alone, so no 7-bit CPU weights differ)."""
    import onnx
    import onnxruntime as ort

    torch = pytest.importorskip("torch")
    apply_stack(tiny_model, [{**ATTN, "layers": ["attn_matmul"]}])
    path = tmp_path / "a.onnx"
    export_model(tiny_model, path, ExportConfig())
    assert _matmuls_on_dequantized(onnx.load(str(path))) == 2 * len(tiny_model.blocks)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(x).numpy()
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert abs(got - ref).max() <= 1e-3 * max(1.0, abs(ref).max())


def test_with_attention_every_linear_and_every_attention_matmul_runs_int8(tiny_model, tmp_path):
    """OpenVINO runs q k^T in i8 (symmetric q and k: no zero points) and A V in u8 (the probabilities on [0, 255])
    in every block; with asymmetric q / k grids it left q k^T in f32 (found by this test)."""
    n_blocks = len(tiny_model.blocks)
    apply_stack(tiny_model, [ATTN])
    path = tmp_path / "m.onnx"
    export_model(tiny_model, path, ExportConfig())
    layers = _runtime_layers(path)
    assert layers[("FullyConnected", "i8")] + layers[("FullyConnected", "u8")] == 4 * n_blocks, layers
    assert layers[("MatMul", "i8")] + layers[("MatMul", "u8")] == 2 * n_blocks, layers
    assert layers[("MatMul", "f32")] == 0, layers


@pytest.mark.parametrize("over,match", [
    ({"a_granularity": "per_token"}, "static per-tensor"),
    ({"softmax": "log2"}, "simulate-only"),
])
def test_deployed_attention_refuses_what_has_no_qdq_form(tiny_model, over, match):
    from vitcompress.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        apply_stack(tiny_model, [{**ATTN, **over}])


def test_deployed_attention_survives_the_artifact_round_trip(tiny_model, tmp_path):
    import torch

    from vitcompress.artifact import save_artifact
    from vitcompress.pipeline import load_artifact

    apply_stack(tiny_model, [ATTN])
    save_artifact(tiny_model, tmp_path / "a")
    again = load_artifact(tmp_path / "a")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_model(x), again(x))
    export_model(again, tmp_path / "a.onnx", ExportConfig())  # still exportable after a load


def test_the_openvino_profile_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/openvino_profile (#42 item 3): dense and ToMe at a static batch, OpenVINO's per-node counters
    summed by role, block and node type."""
    import json

    from benchmarks.openvino_profile import main

    main(["--model", "vit_small_patch14_dinov2", "--img-size", "112", "--model-arg", "depth=4",
          "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--batch-sizes", "2", "--repeat", "2",
          "--points", "dense,ToMe 0.65x", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "openvino_profile.json").read_text())
    dense, tome = (res["points"][n]["batches"]["2"] for n in ("dense", "ToMe 0.65x"))
    assert dense["by_role"]["linear"] > 0 and "token merging ops" not in dense["by_role"]
    assert tome["by_role"]["token merging ops"] > 0
    assert set(dense["by_block"]) >= {"0", "3"}
    assert "## Batch 2" in (tmp_path / "openvino_profile.md").read_text()

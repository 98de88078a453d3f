"""Headless feature extractors (``num_classes=0``: pooled features, no classifier) of every supported family: ToMe
at r=0 is bit-exact, the main deployable methods run, and the artifact and the ONNX export round-trip (#43)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, WIDE, wide_model

from vitcompress.artifact import save_artifact
from vitcompress.export import ExportConfig, export_model
from vitcompress.pipeline import apply_stack, load_artifact

STACKS = {  # a token reduction and a quantization with pruning: each family's head path, kept short for CI
    "ToMe r=2": [{"name": "token_merge", "r": 2}],
    "W8A8 deploy": [{"name": "prune", "mlp": 0.5}, {"name": "quantize", "mode": "deploy"}],
}


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, WIDE["img_size"], WIDE["img_size"], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_headless_tome_at_zero_is_bit_exact(family):
    model = wide_model(family, num_classes=0)
    with torch.inference_mode():
        ref = model(_x())
        apply_stack(model, [{"name": "token_merge", "r": 0}])
        assert torch.equal(model(_x()), ref) and ref.shape == (2, WIDE["embed_dim"])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stack", list(STACKS))
def test_headless_methods_round_trip_and_export(family, stack, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = apply_stack(wide_model(family, num_classes=0), STACKS[stack])
    save_artifact(model, tmp_path / "a")
    again = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        out = again(_x())
        assert torch.equal(out, model(_x())) and out.shape == (2, WIDE["embed_dim"])
    export_model(again, tmp_path / "a.onnx", ExportConfig())
    got = ort.InferenceSession(str(tmp_path / "a.onnx")).run(None, {"input": _x().numpy()})[0]
    assert got.shape == tuple(out.shape)
    if stack != "W8A8 deploy":  # float graphs match closely; int8 on CPUs without VNNI differs by its 7-bit weights
        assert abs(got - out.numpy()).max() <= 1e-3 * max(1.0, float(out.abs().max()))

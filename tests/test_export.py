"""Export round trips on tiny ViTs: export, run in ONNX Runtime (or torch for .pt2), compare with the source."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import require_exact_int8

from vitcompress.errors import ConfigError
from vitcompress.export import ExportConfig, RuntimeModel, export_model, read_metadata
from vitcompress.pipeline import Calibration, apply_stack, compress_to, create_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CALIB = Calibration(data="digits", size=16)


def _batch(model, n=32):
    torch.manual_seed(1)
    return torch.randn(n, 3, *model.patch_embed.img_size)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


STACKS = {
    "dense": [],
    "merged": [{"name": "token_merge", "r": 3}],
    "pruned": [{"name": "prune", "heads": 0.5, "mlp": 0.5}],
    "int8": [{"name": "quantize", "mode": "deploy", "a_granularity": "per_tensor"}],
    "weight_only_int8": [{"name": "quantize", "mode": "deploy", "a_bits": None}],
    "resolution": [{"name": "resolution", "img_size": 24}],
    "merged_triton_attention": [{"name": "token_merge", "r": 3, "backend": "triton"}],  # via its torch reference
    "merged_pruned_int8": [{"name": "prune", "mlp": 0.5}, {"name": "token_merge", "r": 3},
                           {"name": "quantize", "mode": "deploy"}],
    "diffrate": [{"name": "learned_merge", "method": "diffrate", "target_flops": 0.6, "data": "digits",
                  "limit": 64, "batch_size": 32}],  # learned, static counts: sort, prune, merge
}


@pytest.mark.parametrize("name", list(STACKS))
def test_onnx_round_trip(tiny_model, tmp_path, name):
    """Float exports agree on >= 99.9 % of a fixed batch (here: all of it), int8 on >= 99 %; logits are close."""
    if "int8" in name and name != "weight_only_int8":
        require_exact_int8()
    model = apply_stack(tiny_model, STACKS[name], calib=CALIB)
    x = _batch(model)
    with torch.no_grad():
        ref = model(x)
    summary = export_model(model, tmp_path / "m.onnx")
    # ORT fuses DequantizeLinear -> MatMul of weight-only int8 into MatMulNBits, which by default (accuracy level
    # 4) also rounds the activations to int8; level 0 keeps them float, as the source model does
    opts = {"session.qdq_matmulnbits_accuracy_level": 0} if name == "weight_only_int8" else None
    out = RuntimeModel(tmp_path / "m.onnx", opts=opts)(x)
    agree = _agreement(out, ref)
    if name == "weight_only_int8":
        assert torch.allclose(out, ref, atol=1e-4)
    elif "int8" in name:
        assert agree >= 0.99
        assert summary["int8_weights"] > 0
    else:
        assert agree == 1.0
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        assert summary.get("quantize_linear", 0) == 0


def test_int8_export_holds_int8_weights_and_qdq(tiny_model, tmp_path):
    """Every quantized Linear becomes int8 initializer -> DequantizeLinear(axis) -> MatMul, and activations pass a
    QuantizeLinear/DequantizeLinear pair with the calibrated scale; no float copy of those weights remains."""
    model = apply_stack(tiny_model, STACKS["int8"], calib=CALIB)
    export_model(model, tmp_path / "q.onnx")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    n_linear = 4 * len(model.blocks)  # qkv, proj, fc1, fc2
    int8 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == n_linear
    assert not [n for n in inits if n.endswith("weight_t")]  # the float weights were folded away
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == n_linear  # activations only: weights are stored as codes
    assert ops.count("DequantizeLinear") == 2 * n_linear
    codes = onnx.numpy_helper.to_array(inits[int8[0].name])
    assert codes.min() >= -128 and codes.max() <= 127 and len(set(codes.ravel().tolist())) > 16
    blk = model.blocks[0].attn.qkv
    a_scale = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"][0].input[1]
    from vitcompress.export.onnx import _value

    assert float(_value(proto.graph, a_scale)) == pytest.approx(float(blk.a_scale))


def test_token_merging_exports_at_a_static_batch(tiny_model, tmp_path):
    """A static batch size makes the tracer check every shape: ToMe's masking of an empty prefix slice (no prefix
    token falls in set B) failed there (an internal assert), while a dynamic batch exported."""
    model = apply_stack(tiny_model, STACKS["merged"], calib=CALIB)
    x = _batch(model, 6)
    with torch.no_grad():
        ref = model(x)
    export_model(model, tmp_path / "m.onnx", ExportConfig(batch_size=4))
    assert torch.allclose(RuntimeModel(tmp_path / "m.onnx")(x), ref, atol=1e-4, rtol=1e-4)


def test_uint8_activations_and_static_batch(tiny_model, tmp_path):
    model = apply_stack(tiny_model, STACKS["int8"], calib=CALIB)
    x = _batch(model, 11)  # not a multiple of the static batch: the runtime model pads the last chunk
    with torch.no_grad():
        ref = model(x)
    cfg = ExportConfig(batch_size=4, qdq_activations="uint8")
    export_model(model, tmp_path / "u.onnx", cfg)
    proto = onnx.load(str(tmp_path / "u.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    out = RuntimeModel(tmp_path / "u.onnx")(x)
    assert out.shape == ref.shape and _agreement(out, ref) >= 0.99


def test_7bit_weights_for_cpus_without_vnni(tiny_model, tmp_path):
    """--qdq-weight-bits 7 writes the weight codes on +-63 with twice the scale (the grid oneDNN multiplies exactly
    without VNNI: pair sums of 2 x 255 x 63 stay inside int16); ONNX Runtime runs that file as the torch reference of
    the same codes does."""
    from vitcompress.export.onnx import exportable
    from vitcompress.transforms.quantize.qdq import halve_codes, unpack_bits

    model = apply_stack(tiny_model, STACKS["int8"], calib=CALIB)
    cfg = ExportConfig(qdq_activations="uint8", qdq_weight_bits=7)
    export_model(model, tmp_path / "w7.onnx", cfg)
    proto = onnx.load(str(tmp_path / "w7.onnx"))
    codes = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
             if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(codes) == 4 * len(model.blocks) and all(c.min() >= -63 and c.max() <= 63 for c in codes)
    qkv = model.blocks[0].attn.qkv
    want, _ = halve_codes(qkv.w_int8, qkv.w_scale, unpack_bits(qkv.w_half, qkv.in_features))
    assert any(c.shape == tuple(want.t().shape) and (c == want.t().numpy()).all() or
               c.shape == tuple(want.shape) and (c == want.numpy()).all() for c in codes)
    x = _batch(model, 5)
    ref_model, _ = exportable(model, cfg)
    with torch.no_grad():
        ref = ref_model(x)
    torch.testing.assert_close(RuntimeModel(tmp_path / "w7.onnx")(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="qdq_weight_bits"):
        ExportConfig(qdq_weight_bits=6)


def test_metadata_keeps_the_provenance(trained_artifact, tmp_path):
    out = tmp_path / "merged"
    compress_to(out, create_model(str(trained_artifact)), [{"name": "token_merge", "r": 2}])
    model = create_model(str(out))
    export_model(model, tmp_path / "m.onnx")
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["source"] == str(out.resolve())
    assert [t["name"] for t in meta["transforms"]] == ["token_merge"]
    assert meta["data_config"]["input_size"] == [3, 32, 32] and meta["gflops"] > 0
    assert meta["base"]["kind"] == "artifact"


def test_pt2_round_trip(tiny_model, tmp_path):
    model = apply_stack(tiny_model, STACKS["merged"])
    x = _batch(model, 5)
    with torch.no_grad():
        ref = model(x)
    export_model(model, tmp_path / "m.pt2", ExportConfig(format="pt2"))
    out = RuntimeModel(tmp_path / "m.pt2")(x)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("stack,match", [
    ([{"name": "quantize", "w_bits": 8, "a_bits": 8}], "simulated quantization"),
    ([{"name": "quantize", "mode": "deploy", "a_granularity": "per_token"}], "per token"),
    ([{"name": "quantize", "mode": "deploy", "w_bits": 4, "a_bits": None}], "int4"),
    ([{"name": "adaptive_tokens", "budget": 0.5}], "per-image token count"),
    ([{"name": "adaptive_tokens", "method": "mass", "mass": 0.6}], "per-image token count"),
    ([{"name": "sparse_attention", "density": 0.5, "block_size": 8}], "chooses its blocks per image"),
    ([{"name": "learned_merge", "method": "ltmp", "target_flops": 0.6, "data": "digits", "limit": 32}],
     "per-image token count"),
])
def test_unexportable_stacks_are_refused(tiny_model, tmp_path, stack, match):
    model = apply_stack(tiny_model, stack, calib=CALIB)
    with pytest.raises(ConfigError, match=match):
        export_model(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_block_sparse_exports_dense_and_says_so(tiny_model, tmp_path):
    model = apply_stack(tiny_model, [{"name": "block_sparse", "sparsity": 0.5, "block_size": 16}])
    x = _batch(model, 8)
    with torch.no_grad():
        ref = model(x)
    summary = export_model(model, tmp_path / "b.onnx")
    assert any("dense" in n for n in summary["notes"])
    assert torch.allclose(RuntimeModel(tmp_path / "b.onnx")(x), ref, atol=1e-4)


def test_export_never_overwrites(tiny_model, tmp_path):
    target = tmp_path / "mine.onnx"
    target.write_text("a user's file")
    with pytest.raises(ConfigError, match="exists"):
        export_model(copy.deepcopy(tiny_model), target)
    assert target.read_text() == "a user's file"


def test_cli_export_then_eval_against_the_source(trained_artifact, tmp_path, cli):
    merged = tmp_path / "merged"
    assert cli("merge", trained_artifact, "--r", "2", "--out", merged)[0] == 0
    rc, out, err = cli("export", merged, "--out", tmp_path / "m.onnx")
    assert rc == 0, err
    rc, out, err = cli("eval", tmp_path / "m.onnx", "--data", "digits-c", "--limit", "120", "--no-speed",
                       "--json", tmp_path / "e.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["reference"]["source"] == str(merged.resolve())  # agreement is against the exported artifact
    assert res["agreement"] >= 99.9
    assert res["model"]["transforms"] == ["token_merge", "export:onnxruntime"]


@pytest.mark.parametrize("args,match", [
    (["export", "{art}", "--out", "{tmp}/m.pt2"], "must end in .onnx"),
    (["export", "{art}", "--out", "{tmp}/m.onnx", "--batch-size", "zero"], "batch_size"),
    (["eval", "{art}", "--data", "digits", "--runtime", "openvino"], "exported"),
    (["eval", "{tmp}/junk.onnx", "--data", "digits"], "not a readable"),
    (["eval", "{tmp}/junk.onnx", "--data", "digits", "--runtime", "tensorrt"], "runtime must be one of"),
])
def test_cli_errors_are_one_line(trained_artifact, tmp_path, cli, args, match):
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    rc, out, err = cli(*[a.format(art=trained_artifact, tmp=tmp_path) for a in args])
    assert rc != 0 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_damaged_export_is_refused_before_it_runs(tiny_model, tmp_path, cli, fmt):
    """Exports carry a checksum of their weights (ONNX metadata, a .pt2 sidecar); eval checks it first."""
    out = tmp_path / f"m.{fmt}"
    export_model(tiny_model, out, ExportConfig(format=fmt))
    if fmt == "onnx":  # flip bytes inside the largest initializer: a valid file with damaged weights
        proto = onnx.load(str(out))
        init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        raw = bytearray(init.raw_data)
        raw[: 64] = bytes(64)
        init.raw_data = bytes(raw)
        out.write_bytes(proto.SerializeToString())
    else:
        (tmp_path / f"m.{fmt}.sha256").write_text("0" * 64 + f"  m.{fmt}\n")
    rc, _, err = cli("eval", out, "--data", "digits", "--limit", "8", "--no-speed", "--reference", "none")
    assert rc != 0 and "do not match the checksum" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli("eval", out, "--data", "digits", "--limit", "8", "--no-speed", "--reference", "none",
                     "--no-verify")
    assert rc == 0, err
    RuntimeModel(tmp_path / f"m.{fmt}", verify=False)


@pytest.mark.parametrize("name", ["merged", "merged_pruned_int8", "int8", "diffrate"])
def test_onnx_runtime_runs_the_exports_without_a_warning(tiny_model, tmp_path, capfd, name):
    """Exports declare correct shapes, or none, for every intermediate value: ONNX Runtime (which prints a
    warning per mismatched value on every run) prints nothing, at a batch other than the traced one."""
    if "int8" in name:
        require_exact_int8()
    model = apply_stack(tiny_model, STACKS[name], calib=CALIB)
    export_model(model, tmp_path / "m.onnx", ExportConfig(batch_size="dynamic"))
    capfd.readouterr()
    RuntimeModel(tmp_path / "m.onnx")(_batch(model, 16))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err.lower() and "Expected shape" not in err, err

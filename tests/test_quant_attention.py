"""Softmax quantizers, quantized attention matmuls and the patch embedding (simulate mode)."""

import copy
import math

import pytest
import torch
from conftest import FAMILIES, TINY

from vitcompress import compress_, create_model, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.models import data_config
from vitcompress.transforms import QuantConfig, TokenMergeConfig
from vitcompress.transforms.quantize import ops

ALL = ["qkv", "proj", "fc1", "fc2", "attn_matmul"]


def _x(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fwd(model, x=None):
    with torch.inference_mode():
        return model(_x() if x is None else x)


def _calib(model, n=16):
    return load_data("digits", data_config(model), purpose="calib", limit=n).loader(8)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["uniform", "log2", "logsqrt2"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_softmax_codes_match_a_reference_exactly(kind, bits):
    p = torch.randn(3, 2, 17, 17, generator=torch.Generator().manual_seed(bits)).mul(3).softmax(-1)
    p[0, 0, 0, :4] = 0.0  # exact zeros
    scale, top = 0.9, 2**bits - 1
    codes = ops.softmax_codes(p, scale, bits, kind)
    if kind == "uniform":
        ref = torch.round(p / (scale / top)).clamp(0, top)
    else:
        per = 2.0 if kind == "logsqrt2" else 1.0
        ref = torch.tensor([min(top, max(0, round(-per * math.log2(v / scale)))) if v > 0 else top
                            for v in p.flatten().double().tolist()], dtype=torch.float32).reshape(p.shape)
        assert (codes[0, 0, 0, :4] == top).all()
    # the reference rounds in float64; allow only ties decided differently in float32
    assert (codes != ref).float().mean() < 1e-3 and codes.min() >= 0 and codes.max() <= top
    deq = ops.softmax_dequant(codes, scale, bits, kind)
    assert len(deq.unique()) <= 2**bits
    assert torch.equal(ops.softmax_codes(deq, scale, bits, kind), codes)  # idempotent on its own grid
    if kind != "uniform":
        assert (deq[codes == top] == 0).all()
        on_grid = codes < top
        ratio = deq[on_grid] / p[on_grid]  # log grids: relative error at most half a step
        step = 2 ** (0.5 if kind == "logsqrt2" else 1.0)
        assert ratio.max() <= step**0.5 * 1.0001 and ratio.min() >= step**-0.5 / 1.0001


def test_log_grids_trade_range_for_resolution():
    p = torch.randn(4, 64, 65, generator=torch.Generator().manual_seed(0)).mul(2).softmax(-1)
    fq = {k: ops.fake_quant_softmax(p, 1.0, 4, k) for k in ("uniform", "log2", "logsqrt2")}
    small = {k: (v - p).abs()[p < 0.05].mean().item() for k, v in fq.items()}
    large = {k: ((v - p).abs() / p)[p > 0.1].mean().item() for k, v in fq.items()}
    assert small["log2"] < small["uniform"] and small["logsqrt2"] < small["uniform"]  # log grids keep small p
    assert large["logsqrt2"] < large["log2"]  # sqrt(2) steps resolve the large probabilities better


def test_attention_matmuls_at_8_bits_are_close_to_float(tiny_model):
    ref = _fwd(tiny_model)
    compress_(tiny_model, QuantConfig(w_bits=None, a_bits=8, layers=["attn_matmul"], softmax="uniform"),
              calib=_calib(tiny_model))
    assert sum(type(m).__name__ == "QuantAttention" for m in tiny_model.modules()) == 2
    out = _fwd(tiny_model)
    assert not torch.equal(out, ref) and _rel(out, ref) < 0.05
    attn = tiny_model.blocks[0].attn
    assert attn.p_scale.item() <= 1.0 and (attn.qkv_scale > 0).all()


@pytest.mark.parametrize("family", ["deit3_layerscale", "qk_norm", "registers_gap"])
def test_quantized_attention_uses_timms_own_submodules(family):
    name, kw = FAMILIES[family]
    model = create_model(name, **{**TINY, **kw})
    ref = _fwd(model)
    compress_(model, QuantConfig(w_bits=None, a_bits=8, layers=["attn_matmul"], a_granularity="per_token"))
    assert _rel(_fwd(model), ref) < 0.05  # qk-norm / LayerScale / registers: still the same function


@pytest.mark.parametrize("cfg", [
    QuantConfig(w_bits=4, a_bits=4, layers=ALL, softmax="logsqrt2", reparam="repq"),
    QuantConfig(w_bits=6, a_bits=6, layers=ALL + ["patch_embed"], softmax="log2", rounding="gptq"),
    QuantConfig(w_bits=8, a_bits=8, layers=ALL, softmax="uniform", a_granularity="per_token"),
    QuantConfig(dtype="fp8_e4m3", layers=ALL + ["patch_embed"]),
])
def test_full_quantization_reloads_bit_exactly(tmp_path, tiny_model, cfg):
    compress_(tiny_model, cfg, calib=_calib(tiny_model))
    save_artifact(tiny_model, tmp_path / "q")
    loaded = load_artifact(tmp_path / "q")
    assert torch.equal(_fwd(loaded), _fwd(tiny_model))


def test_quantized_attention_stacks_on_token_merging(tiny_model):
    merged = copy.deepcopy(tiny_model)
    compress_(merged, TokenMergeConfig(r=2))
    ref = _fwd(merged)
    both = copy.deepcopy(merged)
    compress_(both, QuantConfig(w_bits=None, a_bits=4, layers=["attn_matmul"], softmax="uniform"),
              calib=_calib(both))
    out = _fwd(both)
    assert not torch.equal(out, ref)  # merging's attention goes through the quantized matmuls
    lossless = copy.deepcopy(merged)
    compress_(lossless, QuantConfig(w_bits=None, a_bits=8, layers=["attn_matmul"]), calib=_calib(lossless))
    assert _rel(_fwd(lossless), ref) < 0.05


def test_patch_embedding_is_quantized(tiny_model):
    ref = _fwd(tiny_model)
    w = tiny_model.patch_embed.proj.weight.detach().clone()
    compress_(tiny_model, QuantConfig(w_bits=4, a_bits=8, layers=["patch_embed"]), calib=_calib(tiny_model))
    conv = tiny_model.patch_embed.proj
    assert type(conv).__name__ == "FakeQuantConv2d"
    assert torch.equal(conv.weight, ops.fake_quant_weight(w.reshape(w.shape[0], -1), 4).reshape(w.shape))
    assert 0 < _rel(_fwd(tiny_model), ref) < 0.2


def test_gptq_on_the_patch_embedding_uses_unfolded_patches(tiny_model):
    from vitcompress.transforms.quantize.calib import _rows

    conv = tiny_model.patch_embed.proj
    x = _x(2)
    rows = _rows(conv, x)  # [B * patches, C*k*k]
    out = (rows @ conv.weight.reshape(conv.weight.shape[0], -1).t() + conv.bias)
    assert torch.allclose(out, conv(x).flatten(2).transpose(1, 2).reshape(-1, conv.out_channels), atol=1e-5)


def test_attention_settings_are_checked(tiny_model):
    with pytest.raises(ConfigError, match="add attn_matmul to the layers"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(softmax="log2"), calib=_calib(tiny_model))
    with pytest.raises(ConfigError, match="the patch embedding is simulate-only"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(mode="deploy", layers=["patch_embed"]),
                  calib=_calib(tiny_model))
    with pytest.raises(ConfigError, match="only Linear, Conv2d, Attention"):
        compress_(copy.deepcopy(tiny_model), QuantConfig(layers=["blocks.0.norm1"]), calib=_calib(tiny_model))


def test_v1_config_dicts_still_load():
    old = {"name": "quantize", "version": 1, "w_bits": 4, "a_bits": 8, "mode": "simulate", "backend": "auto"}
    cfg = QuantConfig.from_dict(old)
    assert cfg.softmax == "none" and cfg.dtype == "int" and cfg.w_bits == 4


def test_softmax_quantizer_cli(tmp_path, cli, trained_artifact):
    rc, out, err = cli("quantize", trained_artifact, "--out", tmp_path / "q", "--calib-data", "digits", "--w-bits", "4",
                       "--a-bits", "4", "--reparam", "repq", "--softmax", "logsqrt2", "--layers", ",".join(ALL))
    assert rc == 0, err
    assert "accuracy-only" in out
    loaded = load_artifact(tmp_path / "q")
    assert loaded.blocks[0].attn._vc_softmax == "logsqrt2"
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "bad", "--calib-data", "digits",
                     "--softmax", "logsqrt2")
    assert rc != 0 and "add attn_matmul to the layers" in err and "Traceback" not in err

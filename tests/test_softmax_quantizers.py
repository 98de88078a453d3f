"""The searched softmax quantizers (AdaLog's adaptive log base, PTQ4ViT's twin uniform) against per-element
references, the calibration search, and the artifact round trip."""

import math

import pytest
import torch
from conftest import TINY

from vitcompress import compress_, create_model, load_artifact, save_artifact
from vitcompress.errors import ConfigError
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize import ops


def _twin_ref(v: float, bits: int, m: float) -> float:
    half = 2 ** (bits - 1)
    d2 = 1 / half
    d1 = d2 / 2**m
    q1 = round(v / d1)
    if q1 <= half - 1:
        return q1 * d1
    return min(max(round(v / d2), 0), half - 1) * d2


def _adalog_ref(v: float, scale: float, bits: int, r: float) -> float:
    top = 2**bits - 1
    if v <= 0:
        return 0.0
    code = max(round(-r * math.log2(v / scale)), 0)
    return 0.0 if code >= top else scale * 2 ** (-code / r)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("param", [0.0, 2.0, 5.0])
def test_twin_uniform_matches_the_per_element_reference(bits, param):
    p = torch.rand(400, generator=torch.Generator().manual_seed(bits)) ** 4  # mostly small, as softmax outputs
    got = ops.fake_quant_softmax(p, 1.0, bits, "twin", param)
    want = torch.tensor([_twin_ref(v, bits, param) for v in p.tolist()])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("r", [1.0, 1.5, 3.0])
def test_adalog_matches_the_per_element_reference(bits, r):
    p = torch.rand(400, generator=torch.Generator().manual_seed(bits)) ** 4
    p[:5] = 0.0
    got = ops.fake_quant_softmax(p, 0.9, bits, "adalog", r)
    want = torch.tensor([_adalog_ref(v, 0.9, bits, r) for v in p.tolist()])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    if r == 2.0:
        torch.testing.assert_close(got, ops.fake_quant_softmax(p, 0.9, bits, "logsqrt2"))


@pytest.mark.parametrize("kind", ["twin", "adalog"])
def test_the_search_ranks_candidates_by_their_error(kind):
    p = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(2)) * 3, -1)
    errors = ops.softmax_search_errors(p, float(p.max()), 4, kind)
    def quant(v: float, c: float) -> float:
        return _twin_ref(v, 4, c) if kind == "twin" else _adalog_ref(v, float(p.max()), 4, c)

    ref = [sum((quant(v, c) - v) ** 2 for v in p.flatten().tolist()) for c in ops.SOFTMAX_SEARCH[kind]]
    torch.testing.assert_close(errors, torch.tensor(ref, dtype=torch.float32), rtol=1e-3, atol=1e-6)


def test_calibration_sets_a_searched_parameter_per_layer():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]
    compress_(model, QuantConfig(w_bits=None, a_bits=4, layers=["attn_matmul"], softmax="twin"), calib=calib)
    assert all(float(b.attn.p_param) in ops.SOFTMAX_SEARCH["twin"] for b in model.blocks)


@pytest.mark.parametrize("kind", ["twin", "adalog"])
def test_round_trip_keeps_the_searched_parameter(kind, tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]
    compress_(model, QuantConfig(w_bits=8, a_bits=4, layers=["qkv", "attn_matmul"], softmax=kind), calib=calib)
    save_artifact(model, tmp_path / "q")
    again = load_artifact(tmp_path / "q")
    assert torch.equal(again.blocks[1].attn.p_param, model.blocks[1].attn.p_param)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("kind", ["twin", "adalog"])
def test_the_hessian_metric_weights_the_attention_output_error(kind):
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(2, 2, 6, 6, generator=g) * 3, -1)
    v, grad = torch.randn(2, 2, 6, 3, generator=g), torch.randn(2, 2, 6, 3, generator=g)
    scale = float(p.max())
    errors = ops.softmax_search_errors(p, scale, 4, kind, v=v, grad=grad)

    def quant(x: float, c: float) -> float:
        return _twin_ref(x, 4, c) if kind == "twin" else _adalog_ref(x, scale, 4, c)

    ref = []  # element by element: sum over outputs of grad^2 * (sum_j (pq_ij - p_ij) v_jd)^2
    for c in ops.SOFTMAX_SEARCH[kind]:
        total = 0.0
        for b, h, i, d in torch.cartesian_prod(*(torch.arange(n) for n in grad.shape)).tolist():
            err = sum((quant(p[b, h, i, j].item(), c) - p[b, h, i, j].item()) * v[b, h, j, d].item()
                      for j in range(6))
            total += grad[b, h, i, d].item() ** 2 * err**2
        ref.append(total)
    torch.testing.assert_close(errors, torch.tensor(ref, dtype=torch.float32), rtol=1e-3, atol=1e-7)
    # unit gradients and v = I: the output error is the probabilities' error, so the two metrics agree
    eye = torch.eye(6).expand(2, 2, 6, 6)
    torch.testing.assert_close(ops.softmax_search_errors(p, scale, 4, kind, v=eye, grad=torch.ones(2, 2, 6, 6)),
                               ops.softmax_search_errors(p, scale, 4, kind), rtol=1e-4, atol=1e-7)


def test_hessian_guided_search_calibrates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(4)) for i in (1, 2)]
    cfg = QuantConfig(w_bits=8, a_bits=4, layers=["qkv", "attn_matmul"], softmax="twin", search_metric="hessian")
    compress_(model, cfg, calib=calib)
    assert all(float(b.attn.p_param) in ops.SOFTMAX_SEARCH["twin"] for b in model.blocks)
    assert all(b.attn._vc_observer is None for b in model.blocks)
    save_artifact(model, tmp_path / "q")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "q")(x), model(x))


def test_the_hessian_metric_needs_a_searched_softmax():
    with pytest.raises(ConfigError, match="search_metric"):
        QuantConfig(a_bits=4, layers=["attn_matmul"], softmax="logsqrt2", search_metric="hessian")


def _twin_gelu_ref(x: float, bits: int, d_neg: float, d_pos: float) -> float:
    half = 2 ** (bits - 1)
    if x < 0:
        return min(max(round(x / d_neg), -half), 0) * d_neg
    return min(max(round(x / d_pos), 0), half - 1) * d_pos


@pytest.mark.parametrize("bits", [4, 6])
def test_post_gelu_twin_matches_a_per_element_reference(bits):
    x = torch.nn.functional.gelu(torch.randn(500, generator=torch.Generator().manual_seed(bits)) * 2)
    got = ops.twin_gelu(x, bits, 0.17 / 2 ** (bits - 1), 0.5)
    want = torch.tensor([_twin_gelu_ref(v, bits, 0.17 / 2 ** (bits - 1), 0.5) for v in x.tolist()])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    assert (got[x < 0] <= 0).all() and len(got[x < 0].unique()) > 1  # the negative range keeps its own levels


@pytest.mark.parametrize("with_grad", [False, True])
def test_post_gelu_search_errors_match_a_reference(with_grad):
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(3, 4, 8, generator=g) * 2)
    w, grad = torch.randn(5, 8, generator=g), torch.randn(3, 4, 5, generator=g)
    errors = ops.gelu_search_errors(x, w, 4, grad if with_grad else None)
    d_neg = -float(x.min()) / 8
    ref = []
    for share in ops.GELU_SEARCH:
        d_pos = share * float(x.max()) / 7
        xq = torch.tensor([_twin_gelu_ref(v, 4, d_neg, d_pos) for v in x.flatten().tolist()]).reshape(x.shape)
        d = (xq - x) @ w.t()
        ref.append(float(((grad**2 if with_grad else 1) * d * d).sum()))
    torch.testing.assert_close(errors, torch.tensor(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 6])
def test_post_gelu_adalog_matches_a_per_element_reference(bits):
    x = torch.nn.functional.gelu(torch.randn(500, generator=torch.Generator().manual_seed(bits)) * 2)
    scale = float(x.max()) + ops.GELU_SHIFT
    got = ops.adalog_gelu(x, bits, scale, 1.5)
    want = torch.tensor([_adalog_ref(v + ops.GELU_SHIFT, scale, bits, 1.5) - ops.GELU_SHIFT for v in x.tolist()])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got >= -ops.GELU_SHIFT - 1e-6).all() and len(got[x < 0].unique()) > 1  # negatives keep levels


def test_post_gelu_adalog_search_errors_match_a_reference():
    g = torch.Generator().manual_seed(6)
    x = torch.nn.functional.gelu(torch.randn(3, 4, 8, generator=g) * 2)
    w = torch.randn(5, 8, generator=g)
    errors = ops.gelu_search_errors(x, w, 4, None, "adalog")
    scale = float(x.max()) + ops.GELU_SHIFT
    ref = []
    for r in ops.SOFTMAX_SEARCH["adalog"]:
        xq = torch.tensor([_adalog_ref(v + ops.GELU_SHIFT, scale, 4, r) - ops.GELU_SHIFT
                           for v in x.flatten().tolist()]).reshape(x.shape)
        ref.append(float(((((xq - x) @ w.t())) ** 2).sum()))
    torch.testing.assert_close(errors, torch.tensor(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,metric", [("twin", "mse"), ("twin", "hessian"), ("adalog", "mse"),
                                         ("adalog", "hessian")])
def test_post_gelu_quantizers_calibrate_fc2_and_round_trip(kind, metric, tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(4)) for i in (1, 2)]
    compress_(model, QuantConfig(w_bits=8, a_bits=4, post_gelu=kind, search_metric=metric), calib=calib)
    for b in model.blocks:
        assert b.mlp.fc2._vc_post_gelu == kind and b.mlp.fc1._vc_post_gelu == "uniform"
        assert not hasattr(b.mlp.fc1, "a_neg_scale") and not hasattr(b.mlp.fc1, "a_param")
        if kind == "twin":
            assert 0 < float(b.mlp.fc2.a_neg_scale) <= 0.1701 / 8  # R1 covers GELU's minimum, -0.17
        else:
            assert any(abs(float(b.mlp.fc2.a_param) - c) < 1e-5 for c in ops.SOFTMAX_SEARCH["adalog"])
    save_artifact(model, tmp_path / "q")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "q")(x), model(x))


@pytest.mark.parametrize("kind", ["twin", "adalog"])
@pytest.mark.parametrize("bad", [dict(a_granularity="per_token"), dict(rounding="brecq"), dict(a_bits=None)])
def test_post_gelu_quantizers_need_a_static_integer_grid(kind, bad):
    with pytest.raises(ConfigError, match=f"post_gelu {kind}"):
        QuantConfig(**{"w_bits": 4, "a_bits": 4, "post_gelu": kind, **bad})


def test_adalog_grid_and_levels_are_the_references():
    """AdaLog's reference (GoatWu/AdaLog, quantizers/logarithm.py and the post-softmax search): codes
    round(-log2(x / s) * 37 / q), levels 2^(-code * q / 37) * s, q an integer searched over 10 .. 110. Ours has the
    same grid and levels; the one deliberate difference: the b-bit top code stands for zero (the reference keeps
    2^b powers and masks what lies past them to 0, one level more than b bits hold)."""
    assert ops.SOFTMAX_SEARCH["adalog"] == tuple(37 / q for q in range(10, 111))
    p = torch.rand(4000, generator=torch.Generator().manual_seed(0)) ** 4
    for q in (10, 23, 37, 74, 110):
        ref_codes = torch.round(-torch.log2(p) * 37 / q)
        ref = 2 ** (-ref_codes * q / 37)
        ours = ops.fake_quant_softmax(p, 1.0, 4, "adalog", 37 / q)
        inside = ref_codes < 2**4 - 1
        torch.testing.assert_close(ours[inside], ref[inside], rtol=1e-5, atol=0)
        assert (ours[~inside] == 0).all()


def test_a_search_at_its_grid_edge_warns():
    from vitcompress.transforms.quantize.calib import _searched

    with pytest.warns(UserWarning, match="edge of its grid"):
        assert _searched("blocks.0.attn", (1.0, 2.0, 3.0), torch.tensor([0.1, 0.5, 0.9]), "adalog") == 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _searched("blocks.0.attn", (1.0, 2.0, 3.0), torch.tensor([0.5, 0.1, 0.9]), "adalog") == 2.0

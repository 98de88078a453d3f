"""PTQ4ViT's scale search (observer ptq4vit): against a loop-by-loop re-implementation of the paper's alternating
search, and end to end on a tiny ViT (simulate and deploy)."""

import pytest
import torch
from conftest import images, infer, wide_model

from vitcompress import compress_
from vitcompress.models import model_info
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize import search

CALIB = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]


def _reference_search(x, w, grad, lo, hi, w_bits, a_bits, rounds=3, n=100):
    """PTQ4ViT: candidates alpha_i = 0.01 + i (1.2 - 0.01) / (n - 1) times the max; per round, the weight scale
    with the input fixed, then the input scale with the weight fixed; loss sum(grad^2 (O_q - O)^2)."""
    alphas = [0.01 + i * (1.2 - 0.01) / (n - 1) for i in range(n)]
    qw = 2 ** (w_bits - 1) - 1
    amax = w.abs().amax(1, keepdim=True)

    def wq(a):
        s = (amax * a / qw).clamp_min(1e-8)
        return torch.round(w / s).clamp(-qw, qw) * s

    def xq(a):
        bottom, top = min(lo * a, 0.0), max(hi * a, 0.0)
        s = max((top - bottom) / (2 ** a_bits - 1), 1e-8)
        z = round(-bottom / s)
        return (torch.clamp(torch.round(x / s) + z, 0, 2 ** a_bits - 1) - z) * s

    def loss(o):
        return float(((o - x @ w.t()) ** 2 * grad ** 2).sum())

    wa, aa = 1.0, 1.0
    for _ in range(rounds):
        wa = min(alphas, key=lambda a: loss(xq(aa) @ wq(a).t()))
        aa = min(alphas, key=lambda a: loss(xq(a) @ wq(wa).t()))
    return wa, aa


def test_the_alternating_search_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g) * torch.linspace(0.2, 3, 12)
    x[0, 3] = 25.0  # an outlier: the best input range is well inside the extremes
    w = torch.randn(7, 12, generator=g)
    grad = torch.rand(64, 7, generator=g)
    lo, hi = float(x.min()), float(x.max())
    fq = search._input_quantizer({"": (lo, hi)}, 4, None)
    wa, aa = 1.0, 1.0
    for _ in range(search.ROUNDS):
        wa = search.ALPHAS[int(search.layer_errors(x, w, grad, fq, 4, None, aa, search.ALPHAS).argmin())]
        aa = search.ALPHAS[int(search.input_errors(x, w, grad, fq, 4, None, wa, search.ALPHAS).argmin())]
    ref_w, ref_a = _reference_search(x, w, grad, lo, hi, 4, 4)
    assert wa == pytest.approx(ref_w, abs=1e-6) and aa == pytest.approx(ref_a, abs=1e-6)
    assert aa < 0.9  # the outlier is clipped


@pytest.mark.parametrize("metric", ["mse", "hessian"])
def test_every_linear_gets_searched_scales(metric):
    model = wide_model()
    ref = infer(model, images())
    compress_(model, QuantConfig(w_bits=4, a_bits=4, observer="ptq4vit", search_metric=metric, calib_size=8),
              calib=CALIB)
    state = model_info(model).transforms[-1]["state"]
    chosen = state["scale_search"]
    assert set(chosen) == set(state["layers"])  # qkv, proj, fc1, fc2 of every block
    assert all(search.ALPHAS[0] <= a <= search.ALPHAS[-1] for c in chosen.values() for a in c.values())
    assert any(c["a_alpha"] != 1.0 or c["w_alpha"] != 1.0 for c in chosen.values())
    out = infer(model, images())
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_deployed_int8_takes_the_searched_scales():
    model = wide_model()
    compress_(model, QuantConfig(mode="deploy", observer="ptq4vit", calib_size=8), calib=CALIB)
    state = model_info(model).transforms[-1]["state"]
    fc1 = model.blocks[0].mlp.fc1
    assert state["weight_clip"].get("blocks.0.mlp.fc1", 1.0) == state["scale_search"]["blocks.0.mlp.fc1"]["w_alpha"]
    assert type(fc1).__name__ == "Int8Linear" and torch.isfinite(infer(model, images())).all()


def test_ptq4vit_refuses_grids_it_does_not_search():
    from vitcompress.errors import ConfigError
    with pytest.raises(ConfigError, match="ptq4vit"):
        QuantConfig(observer="ptq4vit", w_granularity="per_group")


def _reference_fpcs(x, bits, err, width=16, steps=4, eq_n=100):
    """AdaLog's FPCS, from its pseudo-code: percentile-based (scale, zero point) pairs, keep the best ``width``,
    refine each scale on a grid of eq_n / width points around it, ``steps`` searches in all."""
    flat = x.flatten()
    q0, q1, q9, q10 = (float(torch.quantile(flat, p)) for p in (0.0, 0.1, 0.9, 1.0))
    n_levels = 2 ** (bits - 1)
    n_zp = min(16, n_levels)
    n_scale = eq_n // n_zp
    lo_d, hi_d = q9 - q1, q10 - q0
    cands = [((lo_d + i * (hi_d - lo_d) / (n_scale - 1)) / (2 ** bits - 1), float(z))
             for z in range(n_levels - n_zp // 2, n_levels + n_zp // 2) for i in range(n_scale)]
    delta = cands[1][0] - cands[0][0]
    new = eq_n // width
    for step in range(steps):
        cands = sorted(cands, key=lambda c: err(*c))[: 1 if step == steps - 1 else width]
        if step == steps - 1:
            return cands[0]
        offsets = [(i / (new - 1) - 0.5) * delta for i in range(new)]
        delta = delta / (new - 0.5)
        cands = [(max(s + o, 1e-8), z) for s, z in cands for o in offsets]


def test_fpcs_matches_the_reference():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails
    bits = 4

    def err(scale, zp):
        q = (torch.clamp(torch.round(x / scale) + zp, 0, 2 ** bits - 1) - zp) * scale
        return float(((q - x) ** 2).sum())

    got = search.fpcs(x, bits, lambda fq: ((fq(x) - x) ** 2).sum())
    want = _reference_fpcs(x, bits, err)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)
    assert err(*got) < err((float(x.max() - x.min())) / 15, round(float(-x.min()) * 15 / float(x.max() - x.min())))


def test_adalog_searches_every_input_grid():
    model = wide_model()
    compress_(model, QuantConfig(w_bits=4, a_bits=4, observer="adalog", calib_size=8), calib=CALIB)
    state = model_info(model).transforms[-1]["state"]
    assert set(state["scale_search"]) == set(state["layers"])
    fc1 = model.blocks[0].mlp.fc1
    assert 0 <= float(fc1.a_zero) <= 15 and torch.isfinite(infer(model, images())).all()


def test_the_search_reads_the_float_attention_beside_quantized_matmuls():
    """With the attention matmuls quantized (and their grids not yet set) the search still sees floating-point
    inputs: the searched model stays close to the float one."""
    model = wide_model()
    x = images(8)
    ref = infer(model, x)
    compress_(model, QuantConfig(w_bits=8, a_bits=8, observer="ptq4vit", softmax="twin", post_gelu="twin",
                                 search_metric="hessian", calib_size=8, layers=["qkv", "proj", "fc1", "fc2",
                                                                                  "attn_matmul"]), calib=CALIB)
    chosen = model_info(model).transforms[-1]["state"]["scale_search"]
    assert min(c["w_alpha"] for c in chosen.values()) > search.ALPHAS[0]  # no layer collapsed to the grid's floor
    assert (infer(model, x).argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75

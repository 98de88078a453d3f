"""Learned token reduction (LTMP's thresholds and DiffRate's rates, and our merge-only variants of both): the relaxed
merge against ToMe's, gradients, identity at zero strength, the trained artifacts, the budget, the prefix."""

import pytest
import torch
from conftest import FAMILIES, images, infer, wide_model

from vitcompress import compress_, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.models import data_config, model_info
from vitcompress.transforms import LearnedMergeConfig, TokenMergeConfig
from vitcompress.transforms.token_merge import ops
from vitcompress.transforms.token_merge.adaptive import is_adaptive, measure
from vitcompress.transforms.token_merge.learned import rate_weights, threshold_weights
from vitcompress.transforms.tokens import token_counts, tokens_per_layer

_model, _x, _fwd = wide_model, images, infer


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 4, 7])
def test_hard_weighted_merge_is_tomes_merge(protected, r):
    """Merging the r best edges with weight 1, then packing, gives ToMe's tokens and sizes (in another order)."""
    g = torch.Generator().manual_seed(r + 10 * protected)
    x, metric = torch.randn(2, 17, 5, generator=g), torch.randn(2, 17, 8, generator=g)
    size = torch.ones(2, 17, 1)
    sim, rank, a_pos, b_pos, dst = ops.bipartite_edges(metric, size, protected)
    w = ((rank < r) & torch.isfinite(sim)).float()
    xm, sm = ops.weighted_merge(x, size, a_pos, b_pos, dst, w)
    xm, sm, lens, _ = ops.pack_tokens(xm, sm, sm[:, protected:, 0] > 0, protected)
    ref_x, ref_s = ops.merge_wavg(ops.bipartite_soft_matching(metric, r, protected), x, size)
    assert lens.tolist() == [17 - r] * 2
    assert torch.equal(xm[:, :protected], ref_x[:, :protected])
    for b in range(2):
        got = sorted(map(tuple, torch.cat([xm[b], sm[b]], 1).tolist()))
        want = sorted(map(tuple, torch.cat([ref_x[b], ref_s[b]], 1).tolist()))
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


@pytest.mark.parametrize("kind", ["ltm", "diffrate_merge"])
def test_straight_through_weights_are_hard_forward_with_finite_gradients(kind):
    params = torch.nn.Parameter(torch.tensor([0.2 if kind == "ltm" else 2.0]))
    fn = threshold_weights(params=params, pos={0: 0}) if kind == "ltm" else rate_weights(params, {0: 0}, 1.0)
    sim = torch.tensor([[0.9, 0.5, 0.1, -float("inf")]])
    rank = torch.tensor([[0, 1, 2, 3]])
    w = fn(0, sim, rank)
    assert w.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    w.sum().backward()
    assert torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0


METHODS = ["ltmp", "diffrate", "ltm", "diffrate_merge"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_zero_strength_is_bit_exact(family, method):
    model = _model(family)
    ref = _fwd(model, _x())
    compress_(model, LearnedMergeConfig(method=method, layers=[]))
    assert torch.equal(_fwd(model, _x()), ref)


@pytest.fixture(scope="module")
def trained():
    out = {}
    for method in METHODS:
        model = _model()
        compress_(model, LearnedMergeConfig(method=method, target_flops=0.6, data="digits", limit=640, batch_size=32,
                                            lr=0.15 if method == "ltm" else None))
        out[method] = model
    return out


def test_diffrate_solves_a_static_prune_and_merge_schedule(trained):
    model = trained["diffrate"]
    state = model_info(model).transforms[-1]["state"]
    kept = state["values"]["kept"]
    assert state["schedule"][0] == 0 and sum(state["schedule"]) >= sum(state["prune"]) > 0  # block 0 is left whole
    assert all(a >= b for a, b in kept) and all(kept[i][1] >= kept[i + 1][0] for i in range(len(kept) - 1))
    assert tokens_per_layer(model) is not None and not is_adaptive(model)
    n = model.patch_embed.num_patches + 1
    want = token_counts(n, state["schedule"])
    assert tokens_per_layer(model) == [a for a, _ in want]
    rec = state["training"]
    assert abs(rec["train_flops_fraction"] - 0.6) < 0.1, rec


def test_diffrate_merge_solves_a_tome_schedule(trained):
    model = trained["diffrate_merge"]
    state = model_info(model).transforms[-1]["state"]
    assert len(state["schedule"]) == 4 and sum(state["schedule"]) > 0
    assert tokens_per_layer(model) is not None and not is_adaptive(model)
    assert state["training"]["seconds"] > 0 and state["training"]["images"] == 640
    ref = _model()
    compress_(ref, TokenMergeConfig(schedule=state["schedule"]))
    assert torch.equal(_fwd(model, _x()), _fwd(ref, _x()))


@pytest.mark.parametrize("method", ["ltmp", "ltm"])
def test_ltmp_keeps_per_image_counts_and_learns_the_budget(trained, method):
    model = trained[method]
    state = model_info(model).transforms[-1]["state"]
    assert len(state["values"]) == 4 and is_adaptive(model)
    x = next(iter(load_data("digits", data_config(model), limit=64).loader(64)))[0]  # what it was trained on
    stats = measure(model, [x])
    assert abs(stats["flops_fraction_mean"] - 0.6) < 0.1, stats  # the budget it was trained to
    assert stats["flops_fraction_mean"] == pytest.approx(state["training"]["train_flops_fraction"], abs=0.1)
    batch = _fwd(model, x[:8])
    alone = torch.cat([_fwd(model, x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_artifact_round_trip_does_not_retrain(trained, tmp_path, method):
    model = trained[method]
    save_artifact(model, tmp_path / method)
    again = load_artifact(tmp_path / method)
    assert torch.equal(_fwd(again, _x()), _fwd(model, _x()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["deit_distilled", "registers_gap"])
def test_prefix_tokens_are_never_merged(family, method):
    model = _model(family)
    compress_(model, LearnedMergeConfig(method=method, target_flops=0.5, data="digits", limit=32, batch_size=32))
    st = model._vc_token_state
    st.trace_source = True
    p = model.num_prefix_tokens
    _fwd(model, _x(2))
    if st.source is None:  # nothing was learned to merge (diffrate_merge starts at zero rates)
        assert sum(model_info(model).transforms[-1]["state"]["schedule"]) == 0
        return
    n0 = st.source.shape[-1]
    assert torch.equal(st.source[:, :p], torch.eye(n0)[:p].expand(2, -1, -1))


@pytest.mark.parametrize("bad", [dict(target_flops=0), dict(epochs=1.5), dict(layers=[9]), dict(lr=0)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        compress_(_model(), LearnedMergeConfig(**{"data": "digits", "limit": 8, **bad}))

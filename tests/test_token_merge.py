"""Token merging (ToMe) / pruning (EViT): identity at zero strength on every family, schedules, errors."""

import copy

import pytest
import torch
from conftest import FAMILIES, TINY

from vitcompress import compress_, create_model, load_artifact, save_artifact
from vitcompress.bench import count_flops
from vitcompress.errors import ConfigError, Note
from vitcompress.transforms import ResolutionConfig, TokenMergeConfig
from vitcompress.transforms.token_merge import ops
from vitcompress.transforms.tokens import flops_fraction, tokens_per_layer

# 64 patches (32 px, patch 4) and depth 4, so that schedules have room.
WIDE = {**TINY, "patch_size": 4, "depth": 4}


def _x(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fwd(model, x):
    with torch.inference_mode():
        return model(x)


def _model(family, **over):
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, **{**WIDE, **extra, **over})


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", [TokenMergeConfig(r=0), TokenMergeConfig(method="evit", keep_rate=1.0),
                                 TokenMergeConfig(schedule=[0, 0, 0, 0])], ids=["r0", "keep1", "zeros"])
def test_zero_strength_is_bit_exact(family, cfg):
    model = _model(family)
    ref = _fwd(model, _x())
    compress_(model, cfg)
    assert torch.equal(_fwd(model, _x()), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_counts_follow_the_schedule(family):
    model = _model(family)
    p = model.num_prefix_tokens
    compress_(model, TokenMergeConfig(r=5))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    out = _fwd(model, _x())
    for h in hooks:
        h.remove()
    assert seen == [64 + p - 5 * i for i in range(4)] == tokens_per_layer(model)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    st = model._vc_token_state
    assert torch.equal(st.size.sum(1)[:, 0], torch.full((3,), 64.0 + p))  # every patch accounted for once


@pytest.mark.parametrize("family", ["deit_distilled", "registers_gap"])
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_prefix_tokens_are_never_merged(family, method):
    model = _model(family)
    p = model.num_prefix_tokens
    cfg = TokenMergeConfig(r=6, trace_source=True) if method == "tome" else \
        TokenMergeConfig(method="evit", keep_rate=0.5, layers=[1, 2], trace_source=True)
    compress_(model, cfg)
    _fwd(model, _x())
    src = model._vc_token_state.source  # [B, N, N0]
    assert torch.equal(src[:, :p, :p], torch.eye(p).expand(3, -1, -1))  # prefix tokens hold only themselves
    assert src[:, p:, :p].sum() == 0 and src[:, :p, p:].sum() == 0
    assert torch.equal(src.sum(1), torch.ones(3, src.shape[-1]))  # each original token is in exactly one


def _parse_r(num_layers, r):
    """ToMe's parse_r (tome/utils.py), restated step by step: the linear ramp, each layer truncated."""
    r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def test_decreasing_schedule_and_explicit_lists():
    assert ops.constant_schedule(4, 4) == [4, 4, 4, 4]
    assert ops.constant_schedule(4, 5, -1) == [8, 6, 4, 2, 0]
    # the reference's parse_r truncates each layer of the ramp: (16, -1) and (8, -1) on 12 layers remove 187 and 91
    assert ops.constant_schedule(16, 12, -1) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert sum(ops.constant_schedule(8, 12, -1)) == 91
    assert ops.constant_schedule(8, 12, 0.5) == [_parse_r(12, (8, 0.5))[i] for i in range(12)]
    assert sum(ops.constant_schedule(2.5, 4)) == 10
    model = _model("vit")
    compress_(model, TokenMergeConfig(schedule=[10, 0, 3, 0]))
    assert tokens_per_layer(model) == [65, 55, 55, 52]


def test_tome_clamps_each_layer_and_records_the_applied_schedule():
    # patches 64 -> 50 -> 36 -> 22: r=14 fits layers 0-2, layer 3 can merge at most 11 (the reference clamps)
    model = _model("vit")
    with pytest.warns(Note, match=r"ToMe: the schedule \[14 x4\] merges more tokens than the layers have; running "
                                  r"\[14 x3, 11\]"):
        compress_(model, TokenMergeConfig(r=14))
    state = model.vitcompress_info.transforms[-1]["state"]
    assert state["schedule"] == [14, 14, 14, 11] and state["requested_schedule"] == [14, 14, 14, 14]
    assert tokens_per_layer(model) == [65, 51, 37, 23]
    big = _model("vit")
    with pytest.warns(Note, match=r"running \[32, 16, 8, 4\]"):  # every layer merges half of what is left
        compress_(big, TokenMergeConfig(r=99))
    assert big.vitcompress_info.transforms[-1]["state"]["schedule"] == [32, 16, 8, 4]
    assert _fwd(big, _x()).shape == (3, 10)
    with pytest.raises(ConfigError, match="schedule has 3 entries"):
        compress_(_model("vit"), TokenMergeConfig(schedule=[1, 1, 1]))
    with pytest.raises(ConfigError, match="cannot remove 63 tokens in layer 0"):  # EViT still refuses
        compress_(_model("vit"), TokenMergeConfig(method="evit", schedule=[63, 0, 0, 0]))


def _reference_tome(metric, r, protected):
    """ToMe's published matching (facebookresearch/ToMe, merge.py), written out independently for the test. The
    reference protects a class token (``scores[..., 0, :] = -inf``) and a distillation token (``scores[..., :, 0] =
    -inf``); more prefix tokens (registers) extend the same two rules: those at even positions (set A) never merge,
    those at odd positions (set B) never receive. The reference returns [unmerged A, B]; the prefix tokens of both
    sets are then moved to the front, in their own order (what the next layer protects)."""
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    a_pre, b_pre = (protected + 1) // 2, protected // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    for i in range(a_pre):  # the class token (and every prefix token in A)
        scores[..., i, :] = -float("inf")
    for j in range(b_pre):  # the distillation token (and every prefix token in B)
        scores[..., :, j] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if protected:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if r == 0:
            return x
        # the reference returns [unm, dst]; its prefix tokens come through untouched and go to the front
        assert torch.equal(unm[:, :a_pre], x[:, 0:2 * a_pre:2]) and torch.equal(dst[:, :b_pre], x[:, 1:2 * b_pre:2])
        return torch.cat([x[:, :protected], unm[:, a_pre:], dst[:, b_pre:]], dim=1)

    return merge


@pytest.mark.parametrize("n, r, protected", [(197, 8, 1), (197, 16, 1), (65, 40, 1), (64, 12, 0), (50, 3, 1),
                                             (198, 8, 2), (66, 20, 2), (201, 16, 5), (69, 30, 5), (37, 4, 5)])
def test_bipartite_matching_equals_the_reference(n, r, protected):
    """0 protected tokens, a class token, class + distillation (DeiT), class + 4 registers."""
    g = torch.Generator().manual_seed(n + r)
    metric, x = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 8, generator=g)
    ours = ops.bipartite_soft_matching(metric, r, protected)(x, "sum")
    ref = _reference_tome(metric.clone(), r, protected)(x)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, :protected], x[:, :protected])  # the prefix neither merges nor receives


def test_evit_fuses_the_attention_weighted_sum_as_the_paper():
    g = torch.Generator().manual_seed(0)
    x, score = torch.randn(2, 9, 4, generator=g), torch.rand(2, 8, generator=g)
    size = torch.ones(2, 9, 1)
    out, out_size, _ = ops.keep_topk_fuse(x, size, score, drop=4, protected=1)  # keep 3, fuse 5
    order = score.argsort(-1, descending=True)
    for i in range(2):
        keep, fuse = order[i, :3], order[i, 3:]
        assert torch.equal(out[i, 1:4], x[i, 1 + keep])
        torch.testing.assert_close(out[i, 4], (x[i, 1 + fuse] * score[i, fuse, None]).sum(0))  # no renormalisation
    assert out_size[:, -1, 0].tolist() == [5.0, 5.0]
    variant, _, _ = ops.keep_topk_fuse(x, size, score, drop=4, protected=1, normalize=True)
    w = score[0, order[0, 3:]] / score[0, order[0, 3:]].sum()
    torch.testing.assert_close(variant[0, 4], (x[0, 1 + order[0, 3:]] * w[:, None]).sum(0))


def test_evit_uses_no_proportional_attention_unless_asked():
    for method, expected in [("evit", False), ("evit_wavg", True), ("tome", True)]:
        model = _model("vit")
        cfg = TokenMergeConfig(method=method, **({"r": 2} if method == "tome" else {"keep_rate": 0.7}))
        compress_(model, cfg)
        assert model._vc_token_state.prop_attn is expected


@pytest.mark.parametrize("kwargs,pattern", [
    ({}, "give exactly one of"),
    ({"r": 2, "keep_rate": 0.5}, "give exactly one of"),
    ({"keep_rate": 0.5}, "keep_rate must be in \\(0, 1\\] and is for method evit"),
    ({"r": -1}, "r must be >= 0"),
    ({"target_flops": 1.5}, "target_flops is a fraction"),
    ({"r": 2, "inflection": 2}, "inflection must be in"),
    ({"r": 2, "prop_attn": "maybe"}, "prop_attn must be one of: auto, on, off"),
    ({"r": 2, "backend": "cuda"}, "backend must be one of: auto, torch, triton"),
])
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TokenMergeConfig(**kwargs)


def test_applying_twice_is_refused():
    model = _model("vit")
    compress_(model, TokenMergeConfig(r=1))
    with pytest.raises(ConfigError, match="already has token reduction"):
        compress_(model, TokenMergeConfig(r=1))


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_target_flops_is_met_and_matches_the_counter(method):
    model = _model("vit")
    base = count_flops(model, (3, 32, 32))
    compress_(model, TokenMergeConfig(method=method, target_flops=0.6))
    frac = flops_fraction(model, [b._vc_drop for b in model.blocks])
    assert 0.5 < frac <= 0.6
    counted = count_flops(model, (3, 32, 32)) / base
    assert counted == pytest.approx(frac, abs=0.01)  # analytic model vs torch counter (+ matching matmuls)


def test_unreachable_target_is_a_clean_error():
    with pytest.raises(ConfigError, match="out of reach"):
        compress_(_model("vit"), TokenMergeConfig(method="evit", target_flops=0.05))


def test_proportional_attention_stays_in_fused_sdpa():
    from torch.profiler import ProfilerActivity, profile

    model = _model("vit")
    compress_(model, TokenMergeConfig(r=8, prop_attn="on"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _fwd(model, _x())
    ops_run = {e.key for e in prof.key_averages()}
    assert any("scaled_dot_product" in k for k in ops_run)
    assert not {"aten::softmax", "aten::_softmax"} & ops_run  # no manual attention anywhere


def test_proportional_attention_changes_the_output():
    on, off = _model("vit"), _model("vit")
    compress_(on, TokenMergeConfig(r=8, prop_attn="on"))
    compress_(off, TokenMergeConfig(r=8, prop_attn="off"))
    assert not torch.allclose(_fwd(on, _x()), _fwd(off, _x()))


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "qk_norm"])
def test_proportional_attention_through_the_fused_kernel(family):
    """attention=triton: merged layers run vitcompress.kernels.attention with log(size) as a per-key bias
    (Triton's interpreter here), and give SDPA-with-a-float-mask's logits."""
    pytest.importorskip("triton")
    sdpa, fused = _model(family), _model(family)
    compress_(sdpa, TokenMergeConfig(r=8, prop_attn="on", backend="torch"))
    compress_(fused, TokenMergeConfig(r=8, prop_attn="on", backend="triton"))
    calls = []
    import vitcompress.transforms.attention as glue

    real = glue.fused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glue, "fused", lambda *a, **k: calls.append(k["key_bias"].shape) or real(*a, **k))
        out = _fwd(fused, _x())
    assert len(calls) == WIDE["depth"] - 1  # every layer after the first merge has a size bias
    torch.testing.assert_close(out, _fwd(sdpa, _x()), rtol=1e-4, atol=1e-4)
    assert TokenMergeConfig.from_dict({"name": "token_merge", "version": 1, "r": 2}).backend == "auto"


def test_gap_pooling_is_size_weighted():
    model = _model("gap")
    compress_(model, TokenMergeConfig(r=6))
    feats = {}
    model.norm.register_forward_hook(lambda m, a, out: feats.setdefault("x", out))
    with torch.inference_mode():
        pooled = model.forward_head(model.forward_features(_x()), pre_logits=True)
    size = model._vc_token_state.size
    manual = (feats["x"] * size).sum(1) / size.sum(1)
    assert torch.allclose(pooled, model.fc_norm(manual), atol=1e-6)


def test_merged_artifact_round_trip(tmp_path):
    model = _model("deit3_layerscale")
    compress_(model, TokenMergeConfig(method="evit", keep_rate=0.6))
    save_artifact(model, tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    assert tokens_per_layer(loaded) == tokens_per_layer(model)
    assert torch.equal(_fwd(loaded, _x()), _fwd(model, _x()))


def test_resolution_is_a_transform_that_round_trips(tmp_path):
    model = _model("vit")
    same = copy.deepcopy(model)
    compress_(same, ResolutionConfig(img_size=32))
    assert torch.equal(_fwd(same, _x()), _fwd(model, _x()))  # zero strength: same size
    compress_(model, ResolutionConfig(img_size=24))
    out = _fwd(model, _x(size=24))
    assert model.patch_embed.num_patches == 36 and out.shape == (3, 10)
    save_artifact(model, tmp_path / "r")
    assert torch.equal(_fwd(load_artifact(tmp_path / "r"), _x(size=24)), out)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        compress_(_model("vit"), ResolutionConfig(img_size=30))


def test_target_speedup_bisects_on_measured_speed(monkeypatch):
    """The solver's logic, with the timer replaced by a deterministic 'speedup = 1 / GFLOPs fraction'."""
    import vitcompress.transforms.token_merge.transform as bench  # where the solver looks the timer up

    def fake_runner(model, batch, size, cfg):
        return model

    def fake_compare(base, trial, **kw):
        return {"speedup": 1.0 / flops_fraction(trial, [b._vc_drop for b in trial.blocks])}

    monkeypatch.setattr(bench, "model_runner", fake_runner)
    monkeypatch.setattr(bench, "compare", fake_compare)
    model = _model("vit")
    compress_(model, TokenMergeConfig(target_speedup=1.5))
    frac = flops_fraction(model, [b._vc_drop for b in model.blocks])
    assert 1 / frac >= 1.5 and frac > 0.55  # reached, and not much further than needed
    assert model.vitcompress_info.transforms[-1]["state"]["measured_speedup"] == pytest.approx(1 / frac, abs=1e-3)
    with pytest.raises(ConfigError, match="target_speedup 20.0 was not reached"):
        compress_(_model("vit"), TokenMergeConfig(target_speedup=20.0))


def test_flops_model_uses_per_layer_widths_after_pruning():
    from vitcompress.transforms import PruneConfig

    model = _model("vit")
    compress_(model, PruneConfig(heads=0.5, mlp=0.5, scope="per_layer"))
    size = (3, 32, 32)
    dense = count_flops(model, size)
    merged = copy.deepcopy(model)
    compress_(merged, TokenMergeConfig(r=8))
    counted = count_flops(merged, size) / dense
    assert abs(flops_fraction(model, [8, 8, 8, 8]) - counted) < 0.02 * counted
    assert merged.vitcompress_info.transforms[-1]["state"]["flops_fraction"] == pytest.approx(counted, rel=0.02)


def test_older_evit_records_keep_the_fusion_they_were_made_with():
    old = TokenMergeConfig.from_dict({"name": "token_merge", "version": 2, "method": "evit", "keep_rate": 0.7})
    assert old.method == "evit_wavg"
    assert TokenMergeConfig.from_dict({"name": "token_merge", "version": 2, "r": 4}).method == "tome"


def test_evit_default_layers_stay_inside_shallow_models():
    """depth x 1/4, 1/2, 3/4 rounded: on 12 blocks 3, 6, 9; a 2-block model used to get layer 2 (out of range)."""
    from vitcompress.transforms.token_merge.transform import default_evit_layers

    assert default_evit_layers(12) == [3, 6, 9]
    for depth in range(1, 13):
        assert all(0 < layer < depth for layer in default_evit_layers(depth))
    assert default_evit_layers(2) == [1]

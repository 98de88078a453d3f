"""Adaptive per-image token counts (ATS-style): the pure functions against independent references, identity at
zero strength, the padded batch against images run alone, the prefix, the artifact round trip, the solver."""

import pytest
import torch
from conftest import FAMILIES, images, infer, wide_model

from vitcompress import compress_, load_artifact, save_artifact
from vitcompress.errors import ConfigError
from vitcompress.models import model_info
from vitcompress.transforms import AdaptiveTokensConfig
from vitcompress.transforms.token_merge import ops
from vitcompress.transforms.token_merge.adaptive import measure

_model, _x, _fwd = wide_model, images, infer


def _ats_reference(score: list[float], samples: int) -> set[int]:
    """ATS's sampling written out per point: ascending CDF rescaled to [0, 1], points from the first non-zero
    CDF value to 1, each takes the nearest CDF value (the first on ties)."""
    total = sum(score)
    order = sorted(range(len(score)), key=lambda i: score[i])
    cdf, acc = [], 0.0
    for i in order:
        acc += score[i] / total
        cdf.append(acc)
    lo, hi = cdf[0], cdf[-1]
    cdf = [(c - lo) / (hi - lo) for c in cdf]
    start = min(c for c in cdf if c > 0)
    kept = set()
    for j in range(samples):
        y = start + (1 - start) * (j / (samples - 1) if samples > 1 else 0)
        dist = [abs(y - c) for c in cdf]
        kept.add(order[dist.index(min(dist))])
    return {i for i in kept if score[i] > 0}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("samples", [1, 4, 9, 20])
def test_ats_keep_matches_the_written_out_sampling(seed, samples):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(2, 13, generator=g) ** 3  # peaked: strong tokens get drawn repeatedly
    keep = ops.ats_keep(score, samples)
    for b in range(2):
        assert set(keep[b].nonzero().flatten().tolist()) == _ats_reference(score[b].tolist(), samples)


def test_ats_keeps_fewer_distinct_tokens_on_a_peaked_score():
    flat, peaked = torch.ones(1, 16), torch.tensor([[10.0] * 2 + [0.01] * 14])
    assert int(ops.ats_keep(flat, 8).sum()) == 8
    assert int(ops.ats_keep(peaked, 8).sum()) < 8
    assert not ops.ats_keep(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 4)[0, [1, 3]].any()  # padding never kept


def test_mass_keep_takes_the_strongest_tokens_up_to_the_mass():
    score = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    keep = ops.mass_keep(score, 0.7)
    assert keep[0].tolist() == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert int(keep[1].sum()) == 3


def test_pack_tokens_moves_kept_tokens_forward_in_order_and_pads_with_size_zero():
    x = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    size = torch.ones(2, 5, 1)
    keep = torch.tensor([[False, True, False, True], [True, False, False, False]])
    out, s, lens, _ = ops.pack_tokens(x, size, keep, protected=1)
    assert lens.tolist() == [3, 2]
    assert out[:, :, 0].tolist() == [[0, 2, 4], [5, 6, 0]]
    assert s[:, :, 0].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", [AdaptiveTokensConfig(method="mass", mass=1.0),
                                 AdaptiveTokensConfig(budget=0.3, layers=[])], ids=["mass1", "nolayers"])
def test_zero_strength_is_bit_exact(family, cfg):
    model = _model(family)
    ref = _fwd(model, _x())
    compress_(model, cfg)
    assert torch.equal(_fwd(model, _x()), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", [AdaptiveTokensConfig(budget=0.25), AdaptiveTokensConfig(method="mass", mass=0.6)],
                         ids=["sample", "mass"])
def test_a_padded_batch_gives_each_image_its_own_result(family, cfg):
    """Images that keep different counts share a padded batch: the padding must not leak into any image."""
    model = _model(family)
    compress_(model, cfg)
    x = _x(4)
    batch = _fwd(model, x)
    alone = torch.cat([_fwd(model, x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["deit_distilled", "registers_gap"])
def test_prefix_tokens_are_never_dropped(family):
    model = _model(family)
    compress_(model, AdaptiveTokensConfig(budget=0.1))
    st = model._vc_token_state
    st.trace_source = True
    p = model.num_prefix_tokens
    _fwd(model, _x(3))
    assert st.source is not None and st.source.shape[1] < 1 + 64 + p - 1  # tokens were dropped
    n0 = st.source.shape[-1]
    assert torch.equal(st.source[:, :p], torch.eye(n0)[:p].expand(3, -1, -1))


def test_an_easy_and_a_hard_image_keep_different_counts():
    model = _model()
    compress_(model, AdaptiveTokensConfig(method="mass", mass=0.5))
    flat = torch.zeros(1, 3, 32, 32)  # every patch alike: significance is spread evenly
    busy = _x(1, seed=3)
    counts = [measure(model, [img])["tokens_last_mean"] for img in (flat, busy)]
    assert counts[0] != counts[1]
    stats = measure(model, [torch.cat([flat, busy])])
    assert stats["tokens_last_min"] < stats["tokens_last_max"] and stats["tokens_last_std"] > 0


def test_artifact_round_trip_is_bit_exact(tmp_path):
    model = _model()
    compress_(model, AdaptiveTokensConfig(budget=0.3))
    ref = _fwd(model, _x())
    save_artifact(model, tmp_path / "a")
    again = load_artifact(tmp_path / "a")
    assert torch.equal(_fwd(again, _x()), ref)


def test_target_flops_is_solved_on_the_calibration_images(tmp_path):
    model = _model()
    calib = [(_x(8, seed=s), torch.zeros(8)) for s in range(2)]
    compress_(model, AdaptiveTokensConfig(target_flops=0.7, calib_size=16), calib=calib)
    state = model_info(model).transforms[-1]["state"]
    assert state["calibration"]["flops_fraction_mean"] <= 0.7
    assert measure(model, [x for x, _ in calib])["flops_fraction_mean"] == state["calibration"]["flops_fraction_mean"]
    save_artifact(model, tmp_path / "a")
    torch.testing.assert_close(_fwd(load_artifact(tmp_path / "a"), _x()), _fwd(model, _x()), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [dict(budget=0.0), dict(budget=9.0), dict(budget=0.5, mass=0.5),
                                 dict(method="mass", budget=0.5), dict(budget=0.5, layers=[9]),
                                 dict(target_flops=0.5)])
def test_bad_settings_are_one_line_errors(bad):
    model = _model()
    with pytest.raises(ConfigError):
        compress_(model, AdaptiveTokensConfig(**bad))


def test_cannot_stack_two_token_reductions():
    from vitcompress.transforms import TokenMergeConfig

    model = _model()
    compress_(model, TokenMergeConfig(r=2))
    with pytest.raises(ConfigError, match="already has token reduction"):
        compress_(model, AdaptiveTokensConfig(budget=0.5))


def test_the_varlen_kernel_path_matches_the_masked_sdpa():
    pytest.importorskip("triton")
    ref, tri = _model(), _model()
    compress_(ref, AdaptiveTokensConfig(budget=0.25, backend="torch"))
    compress_(tri, AdaptiveTokensConfig(budget=0.25, backend="triton"))
    x = _x(3)
    torch.testing.assert_close(_fwd(tri, x), _fwd(ref, x), atol=1e-4, rtol=1e-4)


def test_cli_commands_of_the_token_family(cli, trained_artifact, tmp_path):
    for cmd, args in (("adapt", ["--budget", "0.5"]), ("adapt", ["--method", "mass", "--mass", "0.8"]),
                      ("sparse-attn", ["--density", "0.5", "--block-size", "4"]),
                      ("learn-merge", ["--method", "diffrate", "--target-flops", "0.7", "--data", "digits",
                                       "--limit", "32"])):
        out = tmp_path / f"{cmd}{len(args)}"
        rc, _, err = cli(cmd, trained_artifact, "--out", out, *args)
        assert rc == 0, err
        rc, text, err = cli("eval", out, "--data", "digits", "--limit", "16", "--no-speed")
        assert rc == 0, err
    assert "tokens kept" in cli("eval", tmp_path / "adapt2", "--data", "digits", "--limit", "16", "--no-speed")[1]
    for cmd, args in (("adapt", ["--budget", "0.5", "--mass", "0.5"]), ("adapt", ["--target-flops", "0.5"]),
                      ("sparse-attn", ["--density", "2"]), ("learn-merge", ["--epochs", "3"])):
        rc, _, err = cli(cmd, trained_artifact, "--out", tmp_path / "bad", *args)
        assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err, (cmd, err)

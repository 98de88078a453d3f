"""Adversarial evaluation: eps 0 changes nothing, the base transfers to itself at 100 %, the gradient twin gives
gradients through every compressed kind, and the CLI's attack flags."""

import pytest
import torch

from vitcompress import compress_, load_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.models import data_config
from vitcompress.robustness import AttackConfig, attack_eval, craft, gradient_twin, parse_eps
from vitcompress.transforms import (
    AdaptiveTokensConfig,
    PruneConfig,
    QuantConfig,
    SparseAttentionConfig,
    TokenMergeConfig,
)

CALIB = [(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(16))]
POINTS = {
    "tome": [TokenMergeConfig(r=2)],
    "w8a8_deploy": [QuantConfig(mode="deploy", a_granularity="per_token")],
    "w4a4_simulate": [QuantConfig(w_bits=4, a_bits=4)],
    "w8a8_attn_softmax": [QuantConfig(w_bits=8, a_bits=8, layers=["qkv", "attn_matmul"], softmax="log2")],
    "pruned": [PruneConfig(heads=0.5)],
    "adaptive": [AdaptiveTokensConfig(budget=0.5)],
    "sparse_attention": [SparseAttentionConfig(density=0.5, block_size=4)],
}


@pytest.fixture(scope="module")
def digits(trained_artifact):
    return load_data("digits", data_config(load_artifact(trained_artifact)), limit=48)


def test_parse_eps():
    assert parse_eps("2/255") == pytest.approx(2 / 255) and parse_eps(0.01) == 0.01
    with pytest.raises(ConfigError, match="eps must be"):
        parse_eps("two")


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_eps_zero_changes_nothing(trained_artifact, digits, method):
    model = load_artifact(trained_artifact)
    cfg = AttackConfig(method=method, eps=0)
    x, y, _ = next(iter(digits.loader(16)))
    assert torch.equal(craft(gradient_twin(model), x, y, cfg), x)
    r = attack_eval(model, digits, cfg)
    assert r["robust_top1"] == r["clean_top1"] and r["attack_success"] == 0


def test_the_base_transfers_to_itself_at_100_percent(trained_artifact, digits):
    model = load_artifact(trained_artifact)
    r = attack_eval(model, digits, AttackConfig(method="pgd", eps="64/255", source="base"), base=model)
    assert r["base_successes"] > 0 and r["transfer_rate"] == 100.0
    assert r["robust_top1"] < r["clean_top1"]


def test_the_eps_ball_and_the_pixel_range_hold(trained_artifact, digits):
    model = load_artifact(trained_artifact)
    x, y, _ = next(iter(digits.loader(8)))
    cfg = data_config(model)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    adv = craft(gradient_twin(model), x, y, AttackConfig(eps=4 / 255, steps=3))
    pix, pix_adv = x * std + mean, adv * std + mean
    assert (pix_adv - pix).abs().max() <= 4 / 255 + 1e-5
    assert pix_adv.min() >= -1e-6 and pix_adv.max() <= 1 + 1e-6


@pytest.mark.parametrize("name", list(POINTS))
def test_every_compressed_kind_has_gradients_and_runs_both_sources(trained_artifact, digits, name):
    base = load_artifact(trained_artifact)
    model = load_artifact(trained_artifact)
    for cfg in POINTS[name]:
        compress_(model, cfg, calib=CALIB)
    with torch.inference_mode():
        xs, ys, _ = (torch.cat(t) for t in zip(*digits.loader(16)))
        clean = (model.eval()(xs).argmax(-1) == ys).float().mean().item() * 100
    twin = gradient_twin(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    twin(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for source in ("self", "base"):
        r = attack_eval(model, digits, AttackConfig(method="fgsm", eps=8 / 255, source=source), base=base)
        assert r["images"] == 48 and r["clean_top1"] == pytest.approx(clean, abs=1e-4)  # the model's own top-1
        # robust = clean-correct images not flipped + wrong ones the attack happened to fix: never fewer than the
        # clean ones the attack did not flip (a bookkeeping error in either count breaks this)
        assert r["robust_top1"] >= r["clean_top1"] * (1 - r["attack_success"] / 100) - 1e-6, r
        assert (r.get("transfer_rate") is None) == (r.get("base_successes", 0) == 0), r  # a rate only over successes


def test_cli_attack_and_one_line_errors(cli, trained_artifact):
    rc, out, err = cli("eval", trained_artifact, "--data", "digits", "--limit", "32", "--no-speed",
                       "--attack", "pgd", "--eps", "8/255", "--steps", "2", "--attack-source", "base")
    assert rc == 0, err
    assert "robust top1" in out and "transfer rate" in out
    for bad in (["--eps", "2/255"], ["--attack", "cw"], ["--attack", "pgd", "--eps", "x"],
                ["--attack", "pgd", "--steps", "0"]):
        rc, _, err = cli("eval", trained_artifact, "--data", "digits", "--limit", "8", "--no-speed", *bad)
        assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err, (bad, err)


@pytest.mark.parametrize("dtype,per_token", [("int", True), ("int", False), ("fp8_e4m3", True), ("fp8_e4m3", False)])
def test_the_gradient_twin_of_a_deployed_layer_is_its_function(dtype, per_token):
    """The attack differentiates what the deployed layer computes: its weights (7-bit ones on a CPU without VNNI)
    and its activation rounding, not a float copy; the rounding passes the gradient straight through."""
    from vitcompress.transforms.quantize.int8_linear import Int8Linear
    from vitcompress.transforms.quantize.lowbit_linear import Fp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    cls = Int8Linear if dtype == "int" else Fp8Linear
    mod = cls.from_linear(lin, per_token=per_token, a_absmax=3.0, backend="auto")
    x = torch.randn(5, 64)
    with torch.inference_mode():
        deployed = mod(x)
    twin = mod.gradient_twin()
    xg = x.clone().requires_grad_(True)
    out = twin(xg)
    float_copy = torch.nn.functional.linear(x, mod.dequantized_weight(), mod.bias.detach())
    err_twin, err_float = (out.detach() - deployed).abs().max(), (float_copy - deployed).abs().max()
    assert err_twin <= 1e-3 * deployed.abs().max() and err_twin < err_float / 5, (err_twin, err_float)
    out.sum().backward()
    torch.testing.assert_close(xg.grad, twin.weight.sum(0).expand_as(xg))  # straight through the rounding

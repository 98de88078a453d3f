"""Mixed-precision PTQ: the allocation meets the budget and narrows the least sensitive layers first; the
transform applies it, records it and round-trips."""

import pytest
import torch
from conftest import TINY

from vitcompress import compress_, create_model, load_artifact, save_artifact
from vitcompress.errors import ConfigError
from vitcompress.models import model_info
from vitcompress.transforms import MixedPrecisionConfig
from vitcompress.transforms.quantize.mixed import allocate
from vitcompress.transforms.quantize.simulate import FakeQuantLinear


def test_allocation_meets_the_budget_and_spends_bits_where_they_matter():
    sens = {"a": {4: 1.0, 6: 0.1, 8: 0.0}, "b": {4: 0.01, 6: 0.005, 8: 0.0}, "c": {4: 0.5, 6: 0.05, 8: 0.0}}
    params = {"a": 100, "b": 100, "c": 100}
    bits = allocate(sens, params, [4, 6, 8], 6.0)
    assert sum(bits[n] * params[n] for n in bits) / 300 <= 6.0
    assert bits["b"] == 4 and bits["a"] >= bits["c"]  # the insensitive layer goes narrow first
    assert allocate(sens, params, [4, 6, 8], 8.0) == {"a": 8, "b": 8, "c": 8}
    assert allocate(sens, params, [4, 6, 8], 5.5, keep=["a"])["a"] == 8
    with pytest.raises(ConfigError, match="out of reach"):
        allocate(sens, params, [4, 6, 8], 4.0, keep=["a"])


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(16))]
    compress_(model, MixedPrecisionConfig(mean_bits=5.0, calib_size=16), calib=calib)
    return model


def test_the_model_gets_the_allocated_widths(mixed):
    state = model_info(mixed).transforms[-1]["state"]
    assert state["mean_bits"] <= 5.0 and set(state["bits"].values()) <= {4, 6, 8}
    for name, b in state["bits"].items():
        m = mixed.get_submodule(name)
        assert isinstance(m, FakeQuantLinear) and m._vc_a_bits == b


def test_round_trip(mixed, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    save_artifact(mixed, tmp_path / "m")
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "m")(x), mixed(x))


@pytest.mark.parametrize("bad", [dict(mean_bits=9), dict(candidates=[1, 4]), dict(quant={"w_bits": 4}),
                                 dict(quant={"observer": "nope"})])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        MixedPrecisionConfig(**bad)


def test_cli_mean_bits_runs_mixed_precision(cli, trained_artifact, tmp_path):
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "m", "--mean-bits", "5", "--candidates", "4,6,8",
                     "--observer", "mse", "--calib-data", "digits", "--calib-size", "16", "--solver", "greedy")
    assert rc == 0, err
    rec = model_info(load_artifact(tmp_path / "m")).transforms[-1]
    assert rec["config"]["solver"] == "greedy"
    assert rec["name"] == "mixed_precision" and rec["config"]["quant"] == {"observer": "mse"}
    assert rec["state"]["mean_bits"] <= 5.0 and rec["config"]["calib_size"] == 16
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "n", "--mean-bits", "5", "--w-bits", "4",
                     "--calib-data", "digits")
    assert rc != 0 and "--mean-bits" in err and "Traceback" not in err
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "n", "--candidates", "4,8", "--calib-data",
                     "digits")
    assert rc != 0 and "give --mean-bits" in err


def test_a_misspelt_keep_name_is_refused():
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(4, 3, 32, 32), torch.zeros(4))]
    with pytest.raises(ConfigError, match="blocks.0.mlp.fc9"):
        compress_(model, MixedPrecisionConfig(mean_bits=5.0, calib_size=4, keep=["blocks.0.mlp.fc9"]), calib=calib)


def test_the_exact_solver_is_optimal_and_never_worse_than_greedy():
    import itertools
    import random

    from vitcompress.transforms.quantize.mixed import allocate_exact

    rng = random.Random(0)
    cands = [4, 6, 8]
    for _ in range(20):
        names = [f"l{i}" for i in range(5)]
        params = {n: rng.choice([64, 128, 256]) for n in names}
        sens = {}
        for n in names:
            hi = rng.random()
            sens[n] = {8: 0.0, 6: hi * rng.random(), 4: hi}
        mean = rng.choice([4.5, 5.0, 6.0, 7.0])
        total = sum(params.values())
        best = min((sum(sens[n][b] for n, b in zip(names, combo)), combo)
                   for combo in itertools.product(cands, repeat=len(names))
                   if sum(b * params[n] for n, b in zip(names, combo)) <= mean * total + 1e-9)
        exact = allocate_exact(sens, params, cands, mean)
        cost = sum(sens[n][b] for n, b in exact.items())
        assert sum(exact[n] * params[n] for n in names) <= mean * total + 1e-9
        assert cost == pytest.approx(best[0])
        greedy = allocate(sens, params, cands, mean)
        assert cost <= sum(sens[n][b] for n, b in greedy.items()) + 1e-12
    assert allocate_exact({"a": {4: 1.0, 8: 0.0}}, {"a": 10}, [4, 8], 6.0, keep=[]) == {"a": 4}
    with pytest.raises(ConfigError, match="out of reach"):
        allocate_exact({"a": {4: 1.0, 8: 0.0}}, {"a": 10}, [4, 8], 6.0, keep=["a"])


def test_older_mixed_precision_configs_keep_the_greedy_solver():
    cfg = MixedPrecisionConfig.from_dict({"name": "mixed_precision", "version": 1, "mean_bits": 5.0})
    assert cfg.solver == "greedy" and MixedPrecisionConfig().solver == "exact"


def test_hutchinson_traces_match_the_exact_hessian_trace():
    """HAWQ-v2's mean trace Tr(H_W)/n, estimated by Hutchinson, against the exact Hessian of a tiny model's loss."""
    from vitcompress.transforms.quantize.mixed import hessian_traces

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 3, 2, 2)
    est = hessian_traces(model, ["1", "3"], [x], samples=4000)
    with torch.no_grad():
        target = model(x).argmax(-1)
    for name in ("1", "3"):
        w0 = model.get_submodule(name).weight.detach().clone()

        def loss(w, name=name):
            m = __import__("copy").deepcopy(model)
            del m.get_submodule(name).weight
            m.get_submodule(name).weight = w
            return torch.nn.functional.cross_entropy(m(x), target, reduction="sum")

        h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
        exact = float(h.diagonal().sum()) / w0.numel()
        assert est[name] == pytest.approx(exact, rel=0.1, abs=1e-4), (name, est[name], exact)


def test_hessian_sensitivity_allocates_within_the_budget():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]
    compress_(model, MixedPrecisionConfig(mean_bits=5.0, calib_size=8, sensitivity="hessian", hutchinson_samples=2),
              calib=calib)
    state = model_info(model).transforms[-1]["state"]
    assert state["mean_bits"] <= 5.0 and len(set(state["bits"].values())) > 1
    sens = state["sensitivity"]
    assert all(s[4] >= s[6] >= s[8] >= 0 for s in sens.values())  # a coarser grid never costs less


def test_hessian_sensitivity_quantizes_the_attention_matmuls_at_the_widest_width():
    """The attention matmuls have no weight for a Hessian trace: they take the widest candidate (they cost no size),
    instead of being left in floating point without a word."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]
    compress_(model, MixedPrecisionConfig(mean_bits=5.0, calib_size=8, sensitivity="hessian", hutchinson_samples=2,
                                          quant={"layers": ["attn_matmul", "fc1", "fc2"]}), calib=calib)
    bits = model_info(model).transforms[-1]["state"]["bits"]
    assert bits["blocks.0.attn"] == bits["blocks.1.attn"] == 8 and bits["blocks.0.mlp.fc1"] < 8
    assert model.blocks[0].attn._vc_a_bits == 8  # quantized, not left in floating point


@pytest.mark.parametrize("quant", [{"layers": ["attn_matmul", "fc1"]},
                                   {"softmax": "log2", "layers": ["attn_matmul", "fc1", "fc2"]}])
def test_attention_matmuls_and_softmax_quantizers_take_part(quant, tmp_path):
    """The attention matmuls (no weights: they cost no size) and a softmax quantizer work in mixed precision."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(8))]
    compress_(model, MixedPrecisionConfig(mean_bits=6.0, calib_size=8, quant=quant), calib=calib)
    state = model_info(model).transforms[-1]["state"]
    att = state["sensitivity"]["blocks.0.attn"]  # free: it takes its least sensitive width
    assert att[state["bits"]["blocks.0.attn"]] == min(att.values()) and state["mean_bits"] <= 6.0
    save_artifact(model, tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "m")(x), model(x))


def test_recovery_and_block_sparsity_refuse_a_mixed_precision_model(mixed):
    """The guards read the layers, not the step's name: mixed precision's fake-quantized layers are protected like
    quantize's (they escaped when the guard tested name == "quantize")."""
    import copy

    from vitcompress.transforms import BlockSparseConfig, RecoveryConfig
    from vitcompress.transforms.layers import simulated_quantization

    assert simulated_quantization(mixed)
    with pytest.raises(ConfigError, match="put recovery before quantize"):
        compress_(copy.deepcopy(mixed), RecoveryConfig(epochs=1, distill="none", data="synthetic:8"))
    with pytest.raises(ConfigError, match="apply block_sparse before quantize"):
        compress_(copy.deepcopy(mixed), BlockSparseConfig(sparsity=0.5, block_size=16))

"""Deployed quantization besides int8 W8A8: weight-only int8/int4, FP8 e4m3 W8A8, bitsandbytes LLM.int8 / NF4."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from vitcompress import compress_, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.device import onednn_int8_exact
from vitcompress.kernels import fp8_gemm as f8
from vitcompress.kernels.int8_gemm import quantize_per_token_ref
from vitcompress.models import data_config
from vitcompress.transforms import QuantConfig
from vitcompress.transforms.quantize import act_codes, int8_linear, ops
from vitcompress.transforms.quantize.lowbit_linear import Fp8Linear, WeightOnlyLinear, pack_int4, unpack_int4
from vitcompress.transforms.quantize.qdq import halve_codes, unpack_bits


def _x(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fwd(model):
    with torch.inference_mode():
        return model(_x())


def _calib(model, n=16):
    return load_data("digits", data_config(model), purpose="calib", limit=n).loader(8)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _size(path):
    return (path / "model.safetensors").stat().st_size


def test_int4_packing_round_trips():
    codes = torch.randint(-8, 8, (5, 12), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 8)])
def test_weight_only_linear_matches_the_reference_grid(bits, group):
    lin = torch.nn.Linear(24, 10)
    q = WeightOnlyLinear.from_linear(lin, bits, group)
    scale = ops.weight_scale(lin.weight, bits, group)
    assert torch.equal(q.codes(), ops.weight_codes(lin.weight, scale, bits))
    ref_w = ops.fake_quant_weight(lin.weight, bits, group)
    assert torch.equal(q.dequantized_weight(), ref_w.float())
    x = torch.randn(3, 24)
    with torch.inference_mode():
        assert torch.allclose(q(x), torch.nn.functional.linear(x, ref_w, lin.bias), atol=1e-6)


@pytest.mark.parametrize("bits,group,max_ratio", [(8, None, 0.45), (4, 16, 0.35)])
def test_weight_only_deploy_is_small_and_reloads(tmp_path, tiny_model, bits, group, max_ratio):
    ref = _fwd(tiny_model)
    save_artifact(tiny_model, tmp_path / "fp32")
    cfg = QuantConfig(mode="deploy", w_bits=bits, a_bits=None, w_granularity="per_group" if group else "per_channel",
                      group_size=group or 64)
    compress_(tiny_model, cfg)
    assert sum(isinstance(m, WeightOnlyLinear) for m in tiny_model.modules()) == 8
    assert _rel(_fwd(tiny_model), ref) < (0.02 if bits == 8 else 0.2)
    save_artifact(tiny_model, tmp_path / "q")
    assert _size(tmp_path / "q") / _size(tmp_path / "fp32") < max_ratio  # tiny model: embeddings stay float
    assert torch.equal(_fwd(load_artifact(tmp_path / "q")), _fwd(tiny_model))


def test_gptq_deploys_the_simulated_weights_exactly(tiny_model):
    import copy

    sim, dep = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    kw = {"w_bits": 4, "a_bits": None, "rounding": "gptq", "w_granularity": "per_group", "group_size": 16}
    compress_(sim, QuantConfig(**kw), calib=_calib(sim))
    compress_(dep, QuantConfig(mode="deploy", **kw), calib=_calib(dep))
    assert torch.equal(dep.blocks[0].mlp.fc1.dequantized_weight(), sim.blocks[0].mlp.fc1.weight.detach())


@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_linear_matches_an_e4m3_reference(per_token):
    lin = torch.nn.Linear(32, 48)
    x = torch.randn(2, 9, 32)
    q = Fp8Linear.from_linear(lin, per_token=per_token, a_absmax=None if per_token else x.abs().max().item())
    w_scale = lin.weight.abs().amax(1) / 448
    assert torch.equal(q.w_fp8, (lin.weight / w_scale[:, None]).to(torch.float8_e4m3fn))
    x2 = x.reshape(-1, 32)
    s = x2.abs().amax(1, keepdim=True) / 448 if per_token else q.a_scale
    ref = ((x2 / s).to(torch.float8_e4m3fn).float() @ q.w_fp8.float().t()) * s * w_scale + lin.bias
    with torch.inference_mode():
        out = q(x).reshape(-1, 48)
        exact = lin(x).reshape(-1, 48)
    assert q.uses_scaled_mm(x) == f8.scaled_mm_rowwise("cpu")  # recent torch: _scaled_mm runs on the CPU too
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2)  # _scaled_mm returns bf16
    q.backend = "triton"  # the fp8 Triton kernel (interpreted on the CPU)
    with torch.inference_mode():
        assert torch.allclose(q(x).reshape(-1, 48), ref, rtol=1e-2, atol=1e-2)
    assert 10 * torch.log10(exact.pow(2).sum() / (out - exact).pow(2).sum()) > 25  # SQNR, dB


@pytest.mark.parametrize("a_granularity,tol", [("per_token", 0.1), ("per_tensor", 0.12)])
def test_fp8_deploy_round_trips(tmp_path, tiny_model, a_granularity, tol):
    ref = _fwd(tiny_model)  # e4m3 keeps 3 mantissa bits; static scales (from digits) also clip random inputs
    compress_(tiny_model, QuantConfig(mode="deploy", dtype="fp8_e4m3", a_granularity=a_granularity),
              calib=_calib(tiny_model))
    assert sum(isinstance(m, Fp8Linear) for m in tiny_model.modules()) == 8
    assert _rel(_fwd(tiny_model), ref) < tol
    save_artifact(tiny_model, tmp_path / "q")
    assert torch.equal(_fwd(load_artifact(tmp_path / "q")), _fwd(tiny_model))


@pytest.mark.parametrize("w_bits,a_bits,cls", [(8, 8, "BnbInt8Linear"), (4, None, "BnbNf4Linear")])
def test_bitsandbytes_backend_runs_counts_and_reloads(tmp_path, tiny_model, w_bits, a_bits, cls):
    from vitcompress.bench import count_flops

    ref = _fwd(tiny_model)
    flops = count_flops(tiny_model, (3, 32, 32))
    save_artifact(tiny_model, tmp_path / "fp32")
    compress_(tiny_model, QuantConfig(mode="deploy", backend="bnb", w_bits=w_bits, a_bits=a_bits))
    assert sum(type(m).__name__ == cls for m in tiny_model.modules()) == 8
    assert _rel(_fwd(tiny_model), ref) < (0.05 if w_bits == 8 else 0.3)
    assert count_flops(tiny_model, (3, 32, 32)) == flops  # bitsandbytes' GEMMs are counted
    save_artifact(tiny_model, tmp_path / "q")
    assert _size(tmp_path / "q") < 0.5 * _size(tmp_path / "fp32")
    assert torch.equal(_fwd(load_artifact(tmp_path / "q")), _fwd(tiny_model))


def test_deploy_cli_formats(tmp_path, cli, trained_artifact):
    for name, extra in {"w4": ["--w-bits", "4", "--a-bits", "none", "--w-granularity", "per_group",
                               "--group-size", "32"],
                        "fp8": ["--dtype", "fp8_e4m3", "--a-granularity", "per_token"],
                        "nf4": ["--backend", "bnb", "--w-bits", "4", "--a-bits", "none"]}.items():
        rc, out, err = cli("quantize", trained_artifact, "--out", tmp_path / name, "--mode", "deploy", *extra)
        assert rc == 0, err
        assert "deployable" in out
        load_artifact(tmp_path / name)
    rc, _, err = cli("quantize", trained_artifact, "--out", tmp_path / "bad", "--mode", "deploy", "--backend", "bnb",
                     "--w-bits", "6")
    assert rc != 0 and "mode deploy executes" in err and "Traceback" not in err


def test_int4_deploy_refuses_an_odd_fan_in(tiny_model):
    from vitcompress.errors import ConfigError

    tiny_model.blocks[0].mlp.fc2 = torch.nn.Linear(63, 64)  # odd input features cannot be packed two a byte
    with pytest.raises(ConfigError, match="int4 packs two codes a byte"):
        compress_(tiny_model, QuantConfig(mode="deploy", w_bits=4, a_bits=None, layers=["fc2"]))


@pytest.mark.skipif(not int8_linear.HAS_ONEDNN, reason="this torch build has no oneDNN int8 linear")
@pytest.mark.parametrize("per_token", [True, False])
def test_cpu_int8_runs_onednn_and_matches_int_mm(per_token):
    """On a CPU the W8A8 layer runs oneDNN's int8 linear under backend auto (prepacked once), and the slow
    torch._int_mm reference under backend torch, with the same codes: outputs agree to float rounding; a changed
    weight is repacked."""
    torch.manual_seed(0)
    mod = int8_linear.Int8Linear.from_linear(nn.Linear(96, 40), per_token=per_token, a_absmax=3.0, backend="auto")
    x = torch.randn(3, 7, 96)
    out = mod(x)
    assert int8_linear.is_packed(mod.w_int8)  # the oneDNN path ran
    mod.backend = "torch"
    ref = mod(x) if int8_linear.ONEDNN_EXACT else _codes_ref(mod, x, 127, halved=True)  # no VNNI: 7-bit weights
    mod.backend = "auto"
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    mod.w_half.copy_(~mod.w_half)  # the negated weights round their odd codes the other way
    mod.w_int8.copy_(-mod.w_int8)
    assert torch.allclose(mod(x) - mod.bias, -(out - mod.bias), atol=1e-5)
    copy.deepcopy(mod)  # the prepacked weight lives outside the module


@pytest.mark.skipif(not int8_linear.HAS_ONEDNN, reason="this torch build has no oneDNN int8 linear")
def test_cpu_int8_leaves_the_input_alone_and_blocks_match_whole(monkeypatch):
    """The blocked activation quantizer never writes into an fp32 input and gives the codes of one whole pass."""
    x = torch.randn(37, 96) * 3
    keep = x.clone()
    monkeypatch.setattr(act_codes, "CHUNK", 96 * 5)  # 5 rows per block: several blocks and a ragged last one
    q, s = act_codes.to_uint8(x, None)
    assert torch.equal(x, keep)
    ref, ref_s = quantize_per_token_ref(x)
    assert torch.equal(q.int() - 128, ref.int()) and torch.equal(s[:, 0], ref_s)
    q, _ = act_codes.to_uint8(x.bfloat16(), 0.05)
    assert torch.equal(q.int() - 128, torch.round(x.bfloat16().float() / 0.05).clamp(-127, 127).int())


def _codes_ref(mod: nn.Module, x: torch.Tensor, qmax: int, halved: bool = False) -> torch.Tensor:
    """The W8A8 layer's output computed exactly in float64 from its codes: activations on +-qmax, and the int8
    weights as they are or halved onto +-63 (``halved``, with twice the scale)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    s = x2.abs().amax(1, keepdim=True) / qmax if mod.per_token else mod.a_scale.double() * 127 / qmax
    q = torch.round(x2 / s).clamp(-qmax, qmax)
    w, ws = mod.w_int8.double(), mod.w_scale.double()
    if halved:  # the 7-bit codes as the float weights round (see test_7bit_codes_round_from_the_float_weights)
        w7, ws7 = halve_codes(mod.w_int8, mod.w_scale, unpack_bits(mod.w_half, mod.in_features))
        w, ws = w7.double(), ws7.double()
    out = (q @ w.t()) * s * ws + mod.bias.double()
    return out.float().reshape(*x.shape[:-1], -1)


AVX2_CHILD = """
import sys
import torch
from torch import nn
from vitcompress.transforms.quantize import int8_linear
sys.path.insert(0, sys.argv[1])
from test_quant_deploy import _codes_ref
assert not int8_linear.ONEDNN_EXACT
torch.manual_seed(0)
lin = nn.Linear(768, 64)
with torch.no_grad():
    lin.weight.copy_(torch.sign(torch.randn(64, 768)) * 0.05)  # every weight at +-127: pair sums far past int16
x = torch.rand(16, 768) * 4 + 1  # large positive activations: codes near the top of the grid
for per_token in (True, False):
    mod = int8_linear.Int8Linear.from_linear(lin, per_token=per_token, a_absmax=5.0, backend="auto")
    out = mod(x)
    assert int8_linear.is_packed(mod.w_int8)
    ref = _codes_ref(mod, x, 127, halved=True)
    err = (out - ref).abs().max().item()
    assert err < 1e-3 * ref.abs().max().item(), (per_token, err)
print("ok")
"""


@pytest.mark.skipif(not int8_linear.HAS_ONEDNN, reason="this torch build has no oneDNN int8 linear")
def test_cpu_int8_is_exact_without_vnni():
    """oneDNN capped below VNNI (an AVX2-only CPU such as Zen 3) sums u8 x s8 pairs in saturating int16: with
    8-bit codes on both sides a ViT-B-sized layer was off by up to 1e5. There the weights take 7 bits and the output
    equals the exact product of those codes."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", AVX2_CHILD, os.path.dirname(__file__)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_7bit_codes_round_from_the_float_weights():
    """The 7-bit codes (CPUs without VNNI, --qdq-weight-bits 7) are round(w / (2 s)) of the float weights, not the
    8-bit codes halved (which is off by up to 0.75 of a 7-bit step for odd codes); an artifact from before the bits
    were stored halves its codes as it did then."""
    torch.manual_seed(1)
    lin = nn.Linear(45, 9)
    mod = int8_linear.Int8Linear.from_linear(lin)
    got, scale = halve_codes(mod.w_int8, mod.w_scale, unpack_bits(mod.w_half, 45))
    want = torch.round(lin.weight / scale[:, None]).clamp(-63, 63)
    assert torch.equal(got.float(), want)
    assert not torch.equal(halve_codes(mod.w_int8, mod.w_scale)[0].float(), want)  # the old rule differs here
    old = {k: v for k, v in mod.state_dict().items() if k != "w_half"}
    again = int8_linear.Int8Linear(45, 9)
    again.load_state_dict(old)
    assert torch.equal(halve_codes(again.w_int8, again.w_scale, unpack_bits(again.w_half, 45))[0],
                       halve_codes(mod.w_int8, mod.w_scale)[0])


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])  # oneDNN honours both names
def test_onednn_exactness_follows_the_isa_cap(monkeypatch, var):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(var, "AVX2")
    assert not onednn_int8_exact()
    monkeypatch.setenv(var, "avx512_core")
    assert not onednn_int8_exact()


def _asym_layer(backend="auto"):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    return lin, int8_linear.Int8Linear.from_linear(lin, per_token=False, a_range=(-0.17, 5.0), backend=backend)


def test_static_activations_take_an_asymmetric_grid_that_every_path_computes_alike():
    """a_range (lo, hi) sets scale (hi - lo) / 255 and its own zero point: 0 stays exact, the oneDNN path (the zero
    point in its call), the int_mm reference (the zero point's share in the bias), the gradient twin and the QDQ
    form compute the same function; on GELU outputs it is finer than the symmetric grid."""
    from vitcompress.transforms.quantize.qdq import QdqActivations, QdqForm

    lin, mod = _asym_layer()
    assert int(mod.a_zero) == round(0.17 / float(mod.a_scale)) and int(mod.a_zero) != 128
    x = torch.nn.functional.gelu(torch.randn(5, 96) * 2)
    s, z = float(mod.a_scale), int(mod.a_zero)
    codes = (torch.round(x.double() / s) + z).clamp(0, 255) - z
    w, ws = mod.w_int8.double(), mod.w_scale.double()
    if int8_linear.cpu_path("auto", x) and not int8_linear.ONEDNN_EXACT:
        w, ws = halve_codes(mod.w_int8, mod.w_scale, unpack_bits(mod.w_half, 96))
        w, ws = w.double(), ws.double()
    ref = ((codes @ w.t()) * s * ws + mod.bias.double()).float()
    assert torch.allclose(mod(x), ref, atol=1e-4, rtol=1e-4)  # auto: oneDNN on this CPU
    mod.backend = "torch"
    exact = ((codes @ mod.w_int8.double().t()) * s * mod.w_scale.double() + mod.bias.double()).float()
    assert torch.allclose(mod(x), exact, atol=1e-4, rtol=1e-4)
    assert torch.allclose(mod(torch.zeros(1, 96)), mod.bias[None], atol=1e-6)  # 0 is on the grid
    twin = int8_linear.Int8Linear.gradient_twin(mod)
    assert torch.allclose(twin(x), exact, atol=1e-4, rtol=1e-4)
    for acts in QdqActivations:
        assert torch.allclose(mod.export_form(QdqForm(acts))(x), exact, atol=1e-4, rtol=1e-4)
    lo, hi = float(x.min()), float(x.max())  # both grids calibrated on x itself: no clipping
    asym = int8_linear.Int8Linear.from_linear(lin, per_token=False, a_range=(lo, hi), backend="torch")
    sym = int8_linear.Int8Linear.from_linear(lin, per_token=False, a_absmax=hi, backend="torch")
    with torch.no_grad():  # the activations' share of the error: against the same int8 weights on float inputs
        want = x @ mod.dequantized_weight().t() + mod.bias
        assert _rel(asym(x), want) < 0.75 * _rel(sym(x), want)


def test_older_static_layers_and_configs_keep_the_symmetric_grid(tmp_path, tiny_model):
    _, mod = _asym_layer()
    state = {k: v for k, v in mod.state_dict().items() if k != "a_zero"}  # an artifact from before a_zero
    fresh = int8_linear.Int8Linear(96, 40, per_token=False)
    fresh.load_state_dict(state)
    assert int(fresh.a_zero) == 128
    assert QuantConfig.from_dict({"name": "quantize", "version": 6, "mode": "deploy"}).a_symmetric is True
    assert QuantConfig().a_symmetric is False
    calib = _calib(tiny_model)
    sym, asym = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    compress_(sym, QuantConfig(mode="deploy", a_symmetric=True), calib=calib)
    compress_(asym, QuantConfig(mode="deploy"), calib=calib)
    assert int(sym.blocks[0].mlp.fc2.a_zero) == 128 and int(asym.blocks[0].mlp.fc2.a_zero) < 128  # GELU: lo ~ -0.17
    save_artifact(asym, tmp_path / "a")
    assert torch.equal(_fwd(load_artifact(tmp_path / "a")), _fwd(asym))


def test_per_token_activations_on_asymmetric_rows_compute_alike_on_every_path():
    """asym: each row on its own uint8 grid; oneDNN (one zero point of 128, each row's own added through the
    weight row sums), the int_mm reference and the gradient twin compute the same function as a float64
    restatement, leave the input alone, and beat the symmetric rows on GELU outputs."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    mod = int8_linear.Int8Linear.from_linear(lin, per_token=True, asym=True)
    x = torch.nn.functional.gelu(torch.randn(2, 9, 96) * 2)
    keep = x.clone()
    x2 = x.reshape(-1, 96).double()
    lo, hi = x2.amin(1, keepdim=True).clamp(max=0), x2.amax(1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).float().double()
    z = torch.round(-lo / s)
    codes = (torch.round(x2 / s) + z).clamp(0, 255) - z

    def ref(w, ws):
        return ((codes @ w.double().t()) * s * ws.double() + mod.bias.double()).float().reshape(2, 9, 40)

    w, ws = mod.w_int8, mod.w_scale
    if int8_linear.cpu_path("auto", x) and not int8_linear.ONEDNN_EXACT:
        w, ws = halve_codes(mod.w_int8, mod.w_scale, unpack_bits(mod.w_half, 96))
    assert torch.allclose(mod(x), ref(w, ws), atol=1e-4, rtol=1e-4)  # auto: oneDNN on this CPU
    assert torch.equal(x, keep)
    mod.backend = "torch"
    exact = ref(mod.w_int8, mod.w_scale)
    assert torch.allclose(mod(x), exact, atol=1e-4, rtol=1e-4)
    assert torch.allclose(int8_linear.Int8Linear.gradient_twin(mod)(x), exact, atol=1e-4, rtol=1e-4)
    sym = int8_linear.Int8Linear.from_linear(lin, per_token=True, backend="torch")
    with torch.no_grad():
        want = x @ mod.dequantized_weight().t() + mod.bias
        assert _rel(mod(x), want) < 0.75 * _rel(sym(x), want)


def test_per_token_grids_follow_the_config_through_an_artifact(tmp_path, tiny_model):
    calib = _calib(tiny_model)
    old = QuantConfig.from_dict({"name": "quantize", "version": 6, "mode": "deploy", "a_granularity": "per_token"})
    for cfg, asym in ((QuantConfig(mode="deploy", a_granularity="per_token"), True), (old, False)):
        m = copy.deepcopy(tiny_model)
        compress_(m, cfg, calib=calib)
        assert m.blocks[0].mlp.fc2.asym is asym
        save_artifact(m, tmp_path / str(asym))
        loaded = load_artifact(tmp_path / str(asym))
        assert loaded.blocks[0].mlp.fc2.asym is asym and torch.equal(_fwd(loaded), _fwd(m))

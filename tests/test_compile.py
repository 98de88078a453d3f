"""The compiled deploy path: every deployable transform (and their stacks) compiles with ``fullgraph=True``, with
zero graph breaks, and its compiled logits match eager. Adaptive token counts are the listed exceptions: they
compile without fullgraph and without CUDA graphs, and say so.

These run Inductor's CPU backend; the GPU runbook's ``headline`` step times the same path with CUDA graphs.
"""

import copy
import json

import pytest
import torch
from conftest import TINY, images, wide_model

from vitcompress import apply_stack, create_model, data_config
from vitcompress.bench import BenchConfig, compile_model, compile_options, model_runner, static_shapes

FP8 = {"name": "quantize", "mode": "deploy", "dtype": "fp8_e4m3", "a_granularity": "per_token"}
INT8 = {"name": "quantize", "mode": "deploy"}
LEARN = {"name": "learned_merge", "target_flops": 0.6, "data": "digits", "limit": 64, "batch_size": 32}
DEPLOYABLE = {  # name: (stack, family of the model)
    "tome r=4": ([{"name": "token_merge", "r": 4}], "vit"),
    "tome (4, -1) prop-attn off": ([{"name": "token_merge", "r": 4, "inflection": -1.0, "prop_attn": "off"}],
                                   "vit"),
    "tome r=4 distilled": ([{"name": "token_merge", "r": 4}], "deit_distilled"),
    "tome r=4 gap": ([{"name": "token_merge", "r": 4}], "registers_gap"),
    "evit keep 0.6": ([{"name": "token_merge", "method": "evit", "keep_rate": 0.6}], "vit"),
    "resolution 24 px": ([{"name": "resolution", "img_size": 24}], "vit"),
    "prune heads + mlp": ([{"name": "prune", "heads": 0.5, "mlp": 0.5}], "vit"),
    "block-sparse 50 %": ([{"name": "block_sparse", "sparsity": 0.5, "block_size": 16}], "vit"),
    "int8 W8A8 static": ([INT8], "vit"),
    "int8 W8A8 per-token": ([{**INT8, "a_granularity": "per_token"}], "vit"),
    "fp8 W8A8": ([FP8], "vit"),
    "weight-only int8": ([{"name": "quantize", "mode": "deploy", "a_bits": None}], "vit"),
    "weight-only int4 g16": ([{"name": "quantize", "mode": "deploy", "w_bits": 4, "a_bits": None,
                               "group_size": 16}], "vit"),
    "sparse attention 50 %": ([{"name": "sparse_attention", "density": 0.5, "block_size": 16}], "vit"),
    "tome + fp8": ([{"name": "token_merge", "r": 4}, FP8], "vit"),
    "tome + int8": ([{"name": "token_merge", "r": 4}, INT8], "vit"),
    "prune + tome + fp8": ([{"name": "prune", "heads": 0.5, "mlp": 0.5}, {"name": "token_merge", "r": 4}, FP8],
                           "vit"),
    "evit + int8 per-token": ([{"name": "token_merge", "method": "evit", "keep_rate": 0.6},
                               {**INT8, "a_granularity": "per_token"}], "vit"),
    "diffrate (learned)": ([{**LEARN, "method": "diffrate"}], "vit"),
}
ADAPTIVE = {  # per-image token counts: no fullgraph, no CUDA graph (the listed exceptions)
    "ats": [{"name": "adaptive_tokens", "budget": 0.3}],
    "mass": [{"name": "adaptive_tokens", "method": "mass", "mass": 0.6}],
    "ltmp (learned)": [{**LEARN, "method": "ltmp"}],
}


def _graph_breaks(model, x) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return explained.graph_break_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("name", list(DEPLOYABLE))
def test_every_deployable_transform_compiles_fullgraph_and_matches_eager(name):
    stack, family = DEPLOYABLE[name]
    model = apply_stack(wide_model(family), stack, calib=None)
    size = data_config(model)["input_size"][-1]
    x = torch.nn.functional.interpolate(images(3), size=size, mode="bilinear") if size != 32 else images(3)
    assert static_shapes(model)
    breaks, reasons = _graph_breaks(model, x)
    assert breaks == 0, reasons
    with torch.inference_mode():
        eager = model(x)
        compiled = compile_model(model, "cpu")(x)
    # Inductor fuses and reorders float math: the same function, rounded differently. A quantizer may then round
    # one code the other way, hence the looser bound for activation-quantized stacks.
    tol = 2e-3 if any(s.get("name") == "quantize" and s.get("a_bits", 8) for s in stack) else 1e-4
    torch.testing.assert_close(compiled, eager, atol=tol * eager.abs().max().item(), rtol=0)
    assert compiled.argmax(-1).tolist() == eager.argmax(-1).tolist()


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_adaptive_token_counts_compile_without_graphs(name):
    model = apply_stack(wide_model(), ADAPTIVE[name], calib=None)
    assert not static_shapes(model)
    opts = compile_options(model, torch.device("cuda"))
    assert opts["fullgraph"] is False and opts["options"]["triton.cudagraphs"] is False
    x = images(3)
    with torch.inference_mode():
        eager = model(x)
        compiled = compile_model(model, "cpu")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4 * eager.abs().max().item(), rtol=0)


def test_static_models_get_cuda_graphs_and_frozen_weights():
    model = apply_stack(wide_model(), [{"name": "token_merge", "r": 4}], calib=None)
    opts = compile_options(model, torch.device("cuda"), "max-autotune")
    assert opts["fullgraph"] and not opts["dynamic"]
    assert opts["options"]["triton.cudagraphs"] and opts["options"]["freezing"] and opts["options"]["max_autotune"]
    assert not compile_options(model, torch.device("cpu"))["options"]["triton.cudagraphs"]


def test_bench_runner_runs_the_compiled_path():
    model = apply_stack(wide_model(), [{"name": "token_merge", "r": 4}], calib=None)
    ref = copy.deepcopy(model)
    cfg = BenchConfig(device="cpu", dtype="fp32", compile=True)
    out = model_runner(model, 2, (3, 32, 32), cfg, images=images(2))()
    with torch.inference_mode():
        torch.testing.assert_close(out, ref(images(2)), atol=1e-4, rtol=0)


def test_eval_compile_records_how_it_compiled(cli, tmp_path):
    out = tmp_path / "e.json"
    rc, _, err = cli("eval", "vit_tiny_patch16_224", "--random-weights", "--img-size", "32", "--patch-size", "8",
                     "--num-classes", "10",
                     "--data", "synthetic:4", "--reference", "none", "--device", "cpu", "--dtype", "fp32",
                     "--compile", "--bench-batch-sizes", "2", "--repeat", "1", "--json", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["compile"] is True
    assert res["compiled"] == {"mode": "default", "fullgraph": True, "cuda_graphs": False, "static_shapes": True}
    assert res["latency_ms"]["2"]["median"] > 0


def test_many_models_compile_in_one_process():
    """A sweep or the headline compiles many models in one process: each one more guarded graph on timm's forward,
    past torch's default limit of 8 (which made fullgraph compiles fail)."""
    torch._dynamo.reset()
    x = images(2)
    for i in range(10):
        torch.manual_seed(i)
        model = create_model("vit_tiny_patch16_224", **{**TINY, "depth": 1}).eval()
        with torch.inference_mode():
            torch.testing.assert_close(compile_model(model, "cpu")(x), model(x), atol=1e-4, rtol=0)

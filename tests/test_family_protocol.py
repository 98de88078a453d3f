"""A new method family is one folder: written here into a temporary package and imported, it works in sweeps (in
torch and in ONNX Runtime), export, attacks and reports with no edit anywhere else. What the family says about
itself (its report group, whether it deploys, its export form, its attack twin, its FLOPs) lives in its own
classes: the family protocol of ARCHITECTURE.md."""

import importlib
import json
import sys
import textwrap

import pytest
import torch

TOY = '''
"""A toy family: fc2 of every block as a rank-r factorisation (SVD), r = keep x min(in, out)."""
import dataclasses

import torch
from torch import nn

from vitcompress.config import Config
from vitcompress.errors import ConfigError
from vitcompress.transforms.layers import replace_module
from vitcompress.transforms.registry import register_transform


@dataclasses.dataclass
class LowRankConfig(Config):
    NAME = "toy_lowrank"
    FAMILY = "lowrank"
    keep: float = 1.0

    def validate(self):
        if not 0 < self.keep <= 1:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")


class LowRankLinear(nn.Module):
    def __init__(self, lin, rank):
        super().__init__()
        u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        self.down = nn.Linear(lin.in_features, rank, bias=False)
        self.up = nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_((s[:rank, None] * vh[:rank]).float())
            self.up.weight.copy_(u[:, :rank].float())
            if lin.bias is not None:
                self.up.bias.copy_(lin.bias)
        self.exported = 0

    def forward(self, x):
        return self.up(self.down(x))

    def export_form(self, qdq_activations):
        type(self).exported = getattr(type(self), "exported", 0) + 1
        return nn.Sequential(self.down, self.up)

    def gradient_twin(self):
        type(self).twinned = getattr(type(self), "twinned", 0) + 1
        return self

    def flops_saved(self, model):
        return 0.0  # a real FLOP count already sees the two smaller GEMMs


def _rank(lin, keep):
    return max(1, round(keep * min(lin.in_features, lin.out_features)))


def _rebuild(model, cfg, state):
    for i, blk in enumerate(model.blocks):
        if cfg.keep < 1:
            replace_module(model, f"blocks.{i}.mlp.fc2", LowRankLinear(blk.mlp.fc2, _rank(blk.mlp.fc2, cfg.keep)))


@register_transform(LowRankConfig, rebuild=_rebuild)
def lowrank_(model, cfg, ctx):
    _rebuild(model, cfg, {})
    return {"keep": cfg.keep}
'''


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    (root / "toyfam").mkdir()
    (root / "toyfam" / "__init__.py").write_text(textwrap.dedent(TOY))
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("toyfam")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("toyfam", None)


def test_the_toy_family_is_the_identity_at_full_rank(toy_family, tiny_model):
    from vitcompress.transforms import compress_

    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = tiny_model(x)
        compress_(tiny_model, toy_family.LowRankConfig(keep=1.0))
        assert torch.equal(tiny_model(x), ref)


def test_a_new_family_works_in_sweeps_export_attacks_and_reports(toy_family, trained_artifact, tmp_path):
    from vitcompress.export import export_model, load_runtime_model
    from vitcompress.pipeline import apply_stack, create_model
    from vitcompress.report import write_report
    from vitcompress.sweep import run_sweep

    stack = [{"name": "toy_lowrank", "keep": 0.5}]
    recipe = {"sweep": {
        "base": {"artifact": str(trained_artifact)}, "eval_data": ["digits"], "eval_limit": 24,
        "accuracy": "digits:top1", "calib_size": 8, "attack": {"method": "fgsm", "eps": "2/255"}, "attack_limit": 8,
        "bench": {"device": "cpu", "dtype": "fp32", "batch_sizes": [2], "warmup": 0, "warmup_s": 0, "repeat": 1},
        "dense": ["onnxruntime"],
        "points": [{"name": "toy", "stack": stack},
                   {"name": "toy in ORT", "stack": stack, "runtime": "onnxruntime"}]}}
    toy_family.LowRankLinear.exported = toy_family.LowRankLinear.twinned = 0
    run_sweep(recipe, tmp_path / "sweep", log=lambda m: None)
    recs = {r["name"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "sweep" / "points").glob("*.json"))}
    assert all(r["status"] == "ok" for r in recs.values()), [r.get("error") for r in recs.values()]
    assert recs["toy"]["family"] == "lowrank" and recs["toy"]["deployable"]
    assert recs["toy in ORT"]["runtime"] == "onnxruntime" and recs["toy in ORT"]["dtype"] == {"2": "fp32"}
    # the same function in both runtimes, and a lower FLOP count than the base's
    assert recs["toy in ORT"]["accuracy"]["digits"]["top1"] == recs["toy"]["accuracy"]["digits"]["top1"]
    assert recs["toy"]["gflops"] < recs["base (uncompressed)"]["gflops"]
    assert "fgsm 2/255 self" in recs["toy"]["robustness"] and toy_family.LowRankLinear.twinned >= 1
    assert toy_family.LowRankLinear.exported >= 1
    res = write_report(tmp_path / "sweep")
    rows = {r["name"]: r for r in res["rows"]}  # (the report's text bolds a name on the front: timing decides)
    assert (rows["toy"]["family"], rows["toy"]["runtime"]) == ("lowrank", "torch")
    assert (rows["toy in ORT"]["family"], rows["toy in ORT"]["runtime"]) == ("lowrank", "onnxruntime")
    assert "| lowrank | onnxruntime |" in (tmp_path / "sweep" / "report.md").read_text()
    assert res["best_dense"]["2"] in ("base (uncompressed)", "dense (onnxruntime)")

    # export and reload outside the sweep, through the family's export_form
    model = apply_stack(create_model(str(trained_artifact)), stack)
    export_model(model, tmp_path / "toy.onnx")
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(load_runtime_model(tmp_path / "toy.onnx")(x), model(x), atol=1e-4, rtol=1e-4)

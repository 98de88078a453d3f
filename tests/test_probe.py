"""The linear probe: a classifier fitted on a frozen backbone's cached features (how a pretrained backbone without
a head becomes the real-model baseline)."""

import pytest
import torch
from conftest import TINY

from vitcompress import create_model
from vitcompress.errors import ConfigError
from vitcompress.probe import fit_logistic, top1
from vitcompress.train import TrainConfig, train


def test_fit_logistic_separates_and_folds_the_standardisation():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g) + 100  # a large common offset, as pretrained features have
    x[:, 0] *= 50  # and one wide channel
    w, b = fit_logistic(x, y, 3, 1e-3)
    assert w.shape == (3, 8) and b.shape == (3,)
    assert top1(x, y, w, b) == 100.0
    # the folded head on raw features equals the standardised head: logits are a plain Linear's
    assert torch.allclose(torch.nn.functional.linear(x, w, b), x @ w.T + b)


def test_probe_trains_only_the_head_and_caches_the_features(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, data="digits", eval_data="digits",
                      limit=64, heldout=32, eval_limit=40, probe=True, probe_weight_decay=[0.01, 1.0], device="cpu",
                      dtype="fp32")
    torch.manual_seed(0)
    lines: list[str] = []
    model, metrics = train(cfg, tmp_path / "probe", log=lines.append)
    torch.manual_seed(0)
    fresh = create_model("vit_tiny_patch16_224", **TINY)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, fresh.blocks[1].mlp.fc2.weight)  # the backbone is frozen
    assert not torch.equal(model.head.weight, fresh.head.weight)
    assert metrics["probe_weight_decay"] in (0.01, 1.0) and set(metrics["heldout_by_weight_decay"]) == {"0.01", "1"}
    assert metrics["train_images"] == 64 and metrics["heldout_images"] == 32 and metrics["eval_images"] == 40
    assert metrics["top1"] > 10  # better than chance on 10 classes from random features
    assert sum("computing the backbone's features" in line for line in lines) == 2  # train + held-out
    # a second run reuses both feature sets and fits the same head
    again: list[str] = []
    model2, _ = train(cfg, None, log=again.append)
    assert sum("reusing cached features" in line for line in again) == 2
    assert torch.equal(model2.head.weight, model.head.weight)
    loaded = create_model(str(tmp_path / "probe"))
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_probe_needs_a_linear_head(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs={**TINY, "num_classes": 0}, data="digits",
                      eval_data=None, limit=16, heldout=16, probe=True, device="cpu", dtype="fp32")
    with pytest.raises(ConfigError, match="the model has 0 outputs"):
        train(cfg, None, log=lambda line: None)

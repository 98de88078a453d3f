"""Shared fixtures: tiny ViT configs (depth 2, width 64), offline hub settings, a tiny trained artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Hub access is never needed by the tests: make offline behaviour deterministic everywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Triton kernels run through Triton's interpreter on a CPU-only machine. This must be set before anything
# imports triton (its standard library is compiled or interpreted at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}

# Every supported family, as a timm id plus overrides that keep it tiny.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "registers_gap": ("vit_base_patch16_reg4_gap_256", {}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "gap": ("vit_base_patch16_gap_224", {}),
}


# 64 patches (32 px, patch 4) and depth 4: room for token schedules, tiles and adaptive counts.
WIDE = {**TINY, "patch_size": 4, "depth": 4}


def wide_model(family: str = "vit", **over):
    """A WIDE model of ``family`` (seeded), in eval mode."""
    from vitcompress import create_model

    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, **{**WIDE, **extra, **over}).eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded random 32 px images [n,3,32,32]."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def infer(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # rich sizes its console from COLUMNS when there is no terminal (80 otherwise): a fixed, wide console, so that
    # no test's output depends on the terminal or on the length of the checkout's path
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture
def tiny_model():
    from vitcompress import create_model

    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", **TINY)


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory):
    """A tiny ViT trained for 2 epochs on part of digits, saved as an artifact."""
    from vitcompress.train import TrainConfig, train

    out = tmp_path_factory.mktemp("art") / "tiny"
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs={**TINY, "pretrained_cfg_overlay": {"crop_pct": 1.0}},
                      data="digits", eval_data="digits", epochs=2, batch_size=64, limit=256, warmup_epochs=0.5)
    train(cfg, out)
    return out


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``rc, out, err = cli("eval", ...)``."""
    from vitcompress.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar10_dir():
    """The shared CIFAR-10 Parquet copy (``../shared/data/cifar10``); skips cleanly where it is absent."""
    if not (SHARED_CIFAR10 / "test.parquet").is_file():
        pytest.skip("../shared/data/cifar10 is not here (a user's clone): CIFAR-10 tests skipped")
    return SHARED_CIFAR10


def require_exact_int8() -> None:
    """Skip a test of 8-bit faithfulness on a CPU without VNNI: there every int8 GEMM torch has (oneDNN's and
    torch._int_mm alike) sums in saturating int16, so the CPU path packs the weights on 7 bits instead (tested
    against its own exact reference in test_quant_deploy, under an AVX2 cap on any CPU)."""
    from vitcompress.transforms.quantize import int8_linear

    if not int8_linear.ONEDNN_EXACT:
        pytest.skip("this CPU's int8 GEMMs saturate without VNNI: no exact 8-bit path to compare with")


@pytest.fixture
def exact_int8() -> None:
    require_exact_int8()

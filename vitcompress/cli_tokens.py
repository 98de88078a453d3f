"""The token-reduction commands: merge (ToMe / EViT), adapt (ATS-style), learn-merge (LTMP / DiffRate-style)
and sparse-attn (Sparsifiner-style). Each maps its flags to one config and makes one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .cli_common import (
    CalibDataOpt,
    CalibSizeOpt,
    ModelArg,
    OutOpt,
    _calibration,
    _given,
    _ints,
    _model,
    _needs_calibration,
    app,
    model_options,
)
from .cli_output import print_records
from .pipeline import compress_to
from .transforms import (
    AdaptiveTokensConfig,
    LearnedMergeConfig,
    ResolutionConfig,
    SparseAttentionConfig,
    TokenMergeConfig,
)


@app.command()
@model_options
def merge(
    model: str = ModelArg,
    out: Path = OutOpt,
    r: float | None = typer.Option(None, "--r", help="ToMe: tokens merged per layer (fractional r is spread)."),
    keep_rate: float | None = typer.Option(None, "--keep-rate", help="EViT: fraction of patch tokens kept."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="Fraction of the base GFLOPs."),
    target_speedup: float | None = typer.Option(None, "--target-speedup", help="Measured speedup to reach."),
    schedule: str | None = typer.Option(None, "--schedule", help="Tokens removed per layer, e.g. 8,8,4,0."),
    method: str | None = typer.Option(None, "--method", help="tome or evit."),
    prop_attn: str | None = typer.Option(None, "--prop-attn", help="Proportional attention: auto, on or off."),
    backend: str | None = typer.Option(None, "--backend",
                                         help="Merged layers' attention kernel: auto, torch or triton."),
    inflection: float | None = typer.Option(None, "--inflection", help="ToMe schedule tilt: -1 decreasing."),
    layers: str | None = typer.Option(None, "--layers", help="EViT reduction layers, e.g. 3,6,9."),
    resolution: int | None = typer.Option(None, "--resolution", help="Also run at this input size (the baseline)."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Token merging (ToMe) or pruning (EViT), training-free; writes an artifact."""
    merge_fields = _given(r=r, keep_rate=keep_rate, target_flops=target_flops, target_speedup=target_speedup,
                          schedule=_ints(schedule, "--schedule"), method=method, prop_attn=prop_attn,
                          backend=backend, inflection=inflection, layers=_ints(layers, "--layers"))
    stack: list[Any] = [ResolutionConfig(img_size=resolution)] if resolution is not None else []
    stack += [TokenMergeConfig(**merge_fields)] if merge_fields or not stack else []
    m = _model(model, **(model_opts or {}))
    print_records("merge", out, compress_to(out, m, stack))


@app.command()
@model_options
def adapt(
    model: str = ModelArg,
    out: Path = OutOpt,
    method: str | None = typer.Option(None, "--method", help="sample (ATS) or mass (top-p of the significance)."),
    budget: float | None = typer.Option(None, "--budget", help="sample: ATS's K as a fraction of the patches."),
    mass: float | None = typer.Option(None, "--mass", help="mass: share of the significance kept."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="Mean fraction of the base GFLOPs."),
    layers: str | None = typer.Option(None, "--layers", help="Blocks that select tokens, e.g. 3,4,5."),
    backend: str | None = typer.Option(None, "--backend", help="Padded batch's attention: auto, torch, triton."),
    calib_data: str | None = CalibDataOpt,
    calib_size: int | None = CalibSizeOpt,
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Adaptive token counts per image (ATS-style), training-free; writes an artifact."""
    stack: list[Any] = [AdaptiveTokensConfig(**_given(
        method=method, budget=budget, mass=mass, target_flops=target_flops, layers=_ints(layers, "--layers"),
        backend=backend, calib_size=calib_size))]
    _needs_calibration(stack, calib := _calibration(calib_data, calib_size))
    m = _model(model, **(model_opts or {}))
    print_records("adapt", out, compress_to(out, m, stack, calib=calib))


@app.command("sparse-attn")
@model_options
def sparse_attn(
    model: str = ModelArg,
    out: Path = OutOpt,
    density: float | None = typer.Option(None, "--density", help="Fraction of key blocks each query block reads."),
    block_size: int | None = typer.Option(None, "--block-size", help="Tile edge in tokens (kernel: >= 16)."),
    layers: str | None = typer.Option(None, "--layers", help="Blocks to sparsify, e.g. 2,3 (default all)."),
    backend: str | None = typer.Option(None, "--backend", help="auto, torch (masked SDPA) or triton."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Training-free block-sparse attention (Sparsifiner-style); writes an artifact."""
    cfg = SparseAttentionConfig(**_given(density=density, block_size=block_size, layers=_ints(layers, "--layers"),
                                         backend=backend))
    m = _model(model, **(model_opts or {}))
    print_records("sparse-attn", out, compress_to(out, m, [cfg]))


@app.command("learn-merge")
@model_options
def learn_merge(
    model: str = ModelArg,
    out: Path = OutOpt,
    method: str | None = typer.Option(None, "--method", help="ltmp (thresholds) or diffrate (per-layer counts)."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="The budget: fraction of the GFLOPs."),
    data: str | None = typer.Option(None, "--data", help="Training images (their train split)."),
    limit: int | None = typer.Option(None, "--limit", help="Train on at most this many images."),
    epochs: float | None = typer.Option(None, "--epochs", help="Fraction of an epoch, <= 1."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Training batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the per-layer numbers."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sigmoid temperature of the relaxation."),
    flops_weight: float | None = typer.Option(None, "--flops-weight", help="Weight of the FLOPs term of the loss."),
    layers: str | None = typer.Option(None, "--layers", help="Blocks that merge, e.g. 0,1,2 (default all)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Learned token merging under a FLOPs budget (LTMP / DiffRate-style), backbone frozen; writes an artifact."""
    cfg = LearnedMergeConfig(**_given(
        method=method, target_flops=target_flops, data=data, limit=limit, epochs=epochs, batch_size=batch_size,
        lr=lr, temperature=temperature, flops_weight=flops_weight, layers=_ints(layers, "--layers"), device=device))
    m = _model(model, **(model_opts or {}))
    print_records("learn-merge", out, compress_to(out, m, [cfg]))

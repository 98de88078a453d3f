"""The token-reduction commands: merge (ToMe / EViT), adapt (ATS-style), learn-merge (LTMP / DiffRate-style),
sparse-attn (Sparsifiner-style) and eventful (Eventful Transformers, for video). Each maps its flags to one config
and makes one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .cli_common import _model, _needs_calibration, compress_command
from .cli_output import print_records
from .pipeline import Calibration, compress_to
from .transforms import (
    AdaptiveTokensConfig,
    EventfulConfig,
    LearnedMergeConfig,
    ResolutionConfig,
    SparseAttentionConfig,
    TokenMergeConfig,
)


@compress_command("merge", TokenMergeConfig)
def merge(model: str, out: Path, opts: dict[str, Any], model_opts: dict[str, Any],
          resolution: int | None = typer.Option(None, "--resolution",
                                                help="Also run at this input size (the baseline).")) -> None:
    """Token merging (ToMe) or pruning (EViT), training-free; writes an artifact."""
    stack: list[Any] = [ResolutionConfig(img_size=resolution)] if resolution is not None else []
    stack += [TokenMergeConfig(**opts)] if opts or not stack else []
    print_records("merge", out, compress_to(out, _model(model, **model_opts), stack))


@compress_command("adapt", AdaptiveTokensConfig, calibrated=True)
def adapt(model: str, out: Path, opts: dict[str, Any], calib: Calibration | None, model_opts: dict[str, Any]) -> None:
    """Adaptive token counts per image (ATS-style), training-free; writes an artifact."""
    stack: list[Any] = [AdaptiveTokensConfig(**opts)]
    _needs_calibration(stack, calib)
    print_records("adapt", out, compress_to(out, _model(model, **model_opts), stack, calib=calib))


@compress_command("sparse-attn", SparseAttentionConfig)
def sparse_attn(model: str, out: Path, opts: dict[str, Any], model_opts: dict[str, Any]) -> None:
    """Training-free block-sparse attention (Sparsifiner-style); writes an artifact."""
    print_records("sparse-attn", out, compress_to(out, _model(model, **model_opts), [SparseAttentionConfig(**opts)]))


@compress_command("learn-merge", LearnedMergeConfig)
def learn_merge(model: str, out: Path, opts: dict[str, Any], model_opts: dict[str, Any]) -> None:
    """Learned token merging under a FLOPs budget (LTMP / DiffRate-style), backbone frozen; writes an artifact."""
    print_records("learn-merge", out, compress_to(out, _model(model, **model_opts), [LearnedMergeConfig(**opts)]))


@compress_command("eventful", EventfulConfig)
def eventful(model: str, out: Path, opts: dict[str, Any], model_opts: dict[str, Any]) -> None:
    """Eventful Transformers: a stateful model for video that re-processes only the tokens that changed since the
    last frame, training-free; writes an artifact (evaluate it on a video: data spec)."""
    print_records("eventful", out, compress_to(out, _model(model, **model_opts), [EventfulConfig(**opts)]))

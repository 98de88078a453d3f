"""The compiled deploy path: ``torch.compile(fullgraph=True)`` over frozen weights, replayed in a CUDA graph per
batch size on a GPU.

Below batch 256 a ViT-B on an H100/H200 waits on kernel launches: eager dense takes 7 ms at batch 1 and 8 ms at
batch 64, and every compression method adds launches. Compiling the whole model into one graph (Inductor fuses
the quantize / dequantize, LayerNorm, GELU and residual elementwise work, and the token merge's gathers) and
replaying it as one CUDA graph removes that floor. Weights are frozen (``freezing``): Inductor folds what depends
only on them, such as a block-sparse layer's dense weight, into constants.

A model whose shapes depend on its input's content (adaptive token counts: ATS, significance mass, learned
thresholds) cannot be captured in a CUDA graph. Its modules say so through ``_vc_dynamic_shapes``; it is compiled
without ``fullgraph`` and without graphs, and :func:`static_shapes` reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..config import StrEnum

RECOMPILE_LIMIT = 1024  # compiled graphs per forward code object in one process (see compile_model)


class CompileMode(StrEnum):
    """How :func:`compile_model` compiles. ``default``: Inductor with frozen weights, fullgraph, CUDA graphs on a
    GPU; ``max-autotune``: the same plus Inductor's GEMM / kernel autotuning (minutes of compilation)."""

    DEFAULT = "default"
    MAX_AUTOTUNE = "max-autotune"


def static_shapes(model: nn.Module) -> bool:
    """Whether every forward of ``model`` has the same shapes for the same input shape: False when a module's
    token count depends on the images (``_vc_dynamic_shapes``), which rules out fullgraph and CUDA graphs."""
    return not any(getattr(m, "_vc_dynamic_shapes", False) for m in model.modules())


# A check-only setting: VITCOMPRESS_COMPILE_BACKEND=aot_eager makes every compile trace its graphs as usual (a graph
# break still fails fullgraph) without Inductor's code generation; the GPU runbook's CPU smoke run uses it, where
# compiling each model for real would take minutes and measure nothing.
CHECK_BACKEND_ENV = "VITCOMPRESS_COMPILE_BACKEND"


def compile_options(model: nn.Module, device: torch.device, mode: CompileMode | str = CompileMode.DEFAULT,
                    ) -> dict[str, object]:
    """The ``torch.compile`` arguments for ``model`` on ``device`` (also what a report records)."""
    mode = CompileMode(mode)
    static = static_shapes(model)
    if backend := os.environ.get(CHECK_BACKEND_ENV):  # trace every graph as usual (fullgraph), generate no code
        return {"fullgraph": static, "dynamic": False if static else None, "backend": backend}
    options: dict[str, object] = {"freezing": True, "triton.cudagraphs": device.type == "cuda" and static}
    if mode == CompileMode.MAX_AUTOTUNE:
        options.update({"max_autotune": True, "coordinate_descent_tuning": True})
    # per-image token counts change shapes from batch to batch: dynamic shapes there, not a recompile per width
    return {"fullgraph": static, "dynamic": False if static else None, "options": options}


def compile_model(model: nn.Module, device: torch.device | str, mode: CompileMode | str = CompileMode.DEFAULT,
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` compiled for inference on ``device``: x [B,3,H,W] -> logits [B,classes].

    Static shapes (``dynamic=False``): each batch size compiles, and on a GPU captures, its own graph once; a model
    with per-image token counts compiles with dynamic shapes instead. With CUDA graphs an output lives in the
    graph's memory until the next call: copy it to keep it.
    """
    device = torch.device(device)
    # Every model compiled in a process shares timm's forward code with the others, each (model, batch size) one
    # more guarded entry on it: torch's default limit (8) would stop a sweep or the headline after a few models
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
    opts = compile_options(model, device, mode)
    compiled = torch.compile(model, **opts)
    graphs = bool(opts.get("options", {}).get("triton.cudagraphs"))  # type: ignore[attr-defined]

    def run(x: torch.Tensor) -> torch.Tensor:
        if graphs:  # each call is a new step: the previous call's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    return run

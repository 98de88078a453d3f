"""Adaptive token counts per image (ATS-style, no training): the config, the transform and the token statistics.

At each selected layer the patch tokens get a significance score, the CLS attention times the value norm
(ATS's score), and a rule keeps some of them:

- ``sample``: ATS's inverse-transform sampling (Fayyaz et al., 2022) with ``budget`` x the image's patch
  tokens as the number of samples K; repeated draws of strong tokens leave fewer distinct tokens;
- ``mass``: the fewest strongest tokens holding ``mass`` of the total significance (a top-p threshold).

The dropped tokens are gone (ATS prunes, it does not fuse). Counts differ per image, so a batch is packed and
padded to its longest image (see ``block.py``): batch 1 gains in full, a batch gains only down to its
longest image. The GFLOPs reported for these models are the mean per image over the data they ran on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ...config import Config, StrEnum, upgrade_backend
from ...errors import ConfigError
from ...kernels._triton import Backend
from ..layers import calib_batches
from ..registry import TransformContext, register_transform
from ..tokens import analytic_flops, counts_flops_fraction
from . import ops
from .block import Selector, TokenState, install_blocks

MAX_BUDGET = 8.0


class AdaptiveMethod(StrEnum):
    SAMPLE = "sample"  # ATS: inverse-transform sampling of the significance CDF
    MASS = "mass"  # keep the tokens that hold this share of the significance


@dataclasses.dataclass
class AdaptiveTokensConfig(Config):
    """Per-image token counts, training-free. Give exactly one strength:

    budget: (sample) ATS's K, samples per layer as a multiple of the image's patch tokens, in (0, 8]: the paper
    keeps K <= the tokens (budget <= 1); a peaked image draws its strong tokens repeatedly, so a milder
    reduction needs more samples than tokens; ``layers: []`` is off;
    mass: (mass) share of the significance the kept tokens must hold; 1 = off;
    target_flops: mean GFLOPs fraction over ``calib_size`` calibration images, solved by bisection.
    layers: where tokens are selected (default: every block from depth/4 on, as ATS's 3..11 of 12).
    backend: the padded batch's masked attention: ``triton`` (varlen by ``seq_lens``), ``torch`` (SDPA with a
    -inf mask), ``auto`` triton on CUDA.
    """

    NAME = "adaptive_tokens"

    FAMILY = "token"
    VERSION = 2  # 2: attention -> backend
    method: AdaptiveMethod = AdaptiveMethod.SAMPLE
    budget: float | None = None
    mass: float | None = None
    target_flops: float | None = None
    layers: list[int] | None = None
    calib_size: int = 256
    backend: Backend = Backend.AUTO

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        return upgrade_backend(data, version, 2)

    @property
    def needs_calibration(self) -> bool:
        return self.target_flops is not None

    @property
    def exportable(self) -> bool:
        return False  # per-image token counts: no static graph holds them

    def validate(self) -> None:
        if self.backend == Backend.BNB:
            raise ConfigError("backend must be one of: auto, torch, triton (bnb is for quantized layers)")
        given = [n for n in ("budget", "mass", "target_flops") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of budget, mass, target_flops" + (f" (got {', '.join(given)})"
                                                                                 if given else ""))
        for name, top in (("budget", MAX_BUDGET), ("mass", 1), ("target_flops", 1)):
            value = getattr(self, name)
            if value is not None and not 0 < value <= top:
                raise ConfigError(f"{name} must be in (0, {top}], got {value}")
        if self.budget is not None and self.method != AdaptiveMethod.SAMPLE:
            raise ConfigError("budget is for method sample (use mass for method mass)")
        if self.mass is not None and self.method != AdaptiveMethod.MASS:
            raise ConfigError("mass is for method mass (use budget for method sample)")
        if self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")


def default_layers(depth: int) -> list[int]:
    return list(range(depth // 4, depth))


def selector(model: nn.Module, method: AdaptiveMethod, strength: float) -> Selector:
    """The keep rule for ``strength`` (budget or mass): significance [B,M] -> keep [B,M]."""
    if method == AdaptiveMethod.MASS:
        return lambda score: ops.mass_keep(score, strength)
    samples = max(1, round(strength * model.patch_embed.num_patches))
    return lambda score: ops.ats_keep(score, max(samples, min(8, score.shape[1])))


def install(model: nn.Module, cfg: AdaptiveTokensConfig, strength: float) -> None:
    """Switch the blocks to adaptive selection at ``cfg.layers`` with ``strength``; mass 1 changes nothing."""
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply one token reduction method")
    depth = len(model.blocks)
    layers = default_layers(depth) if cfg.layers is None else cfg.layers
    if any(not 0 <= layer < depth for layer in layers):
        raise ConfigError(f"layers must be in [0, {depth - 1}], got {layers}")
    if (cfg.method == AdaptiveMethod.MASS and strength >= 1) or not layers:
        return
    state = TokenState(protected=model.num_prefix_tokens, prop_attn=False, method=None, backend=cfg.backend,
                       select=selector(model, cfg.method, strength), summarize=trace_summary)
    install_blocks(model, state, [0] * depth, [i in layers for i in range(depth)])


def is_adaptive(model: nn.Module) -> bool:
    """Whether ``model``'s token counts differ per image."""
    st = getattr(model, "_vc_token_state", None)
    return st is not None and st.adaptive


@contextlib.contextmanager
def token_trace(model: nn.Module) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Record, for every forward run inside, the (tokens into attention [B], into the MLP [B]) of each block.
    Yields the list of forwards (empty for a model without token reduction)."""
    st: TokenState | None = getattr(model, "_vc_token_state", None)
    if st is None:
        yield []
        return
    with st.tracing(len(model.blocks)) as forwards:
        yield forwards


def trace_summary(model: nn.Module, forwards: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, Any]:
    """Mean and spread over images of the tokens each image kept, and its GFLOPs fraction."""
    if not forwards:
        return {}
    counts = [(torch.cat([f[i][0] for f in forwards]).float(), torch.cat([f[i][1] for f in forwards]).float())
              for i in range(len(forwards[0]))]
    frac = counts_flops_fraction(model, counts)
    gflops = analytic_flops(model, counts) / 1e9
    last = counts[-1][1]
    mean_tokens = torch.stack([m for _, m in counts]).mean(0)  # per image: tokens into each MLP, averaged
    return {"images": len(last), "tokens_last_mean": round(last.mean().item(), 2),
            "tokens_last_std": round(last.std().item() if len(last) > 1 else 0.0, 2),
            "tokens_last_min": int(last.min()), "tokens_last_max": int(last.max()),
            "tokens_per_layer_mean": [round(m.mean().item(), 2) for _, m in counts],
            "tokens_mean_std": round(mean_tokens.std().item() if len(last) > 1 else 0.0, 2),
            "flops_fraction_mean": round(frac.mean().item(), 4),
            "flops_fraction_std": round(frac.std().item() if len(last) > 1 else 0.0, 4),
            "gflops_mean": gflops.mean().item()}


@torch.inference_mode()
def measure(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """:func:`trace_summary` over ``batches`` (images [b,3,H,W])."""
    was = model.training
    model.eval()
    with token_trace(model) as forwards:
        for x in batches:
            model(x)
    model.train(was)
    return trace_summary(model, forwards)


def solve_flops(model: nn.Module, cfg: AdaptiveTokensConfig, calib: Iterable[Any]) -> tuple[float, dict[str, Any]]:
    """The largest strength whose mean GFLOPs fraction over the calibration images is <= the target."""
    device = next(model.parameters()).device
    images = [x for x, _ in calib_batches(calib, cfg.calib_size, device)]
    install(model, cfg, 0.5)
    st: TokenState = model._vc_token_state
    target = float(cfg.target_flops)  # type: ignore[arg-type]

    def fraction(s: float) -> tuple[float, dict[str, Any]]:
        st.select = selector(model, cfg.method, s)
        stats = measure(model, images)
        return stats["flops_fraction_mean"], stats

    lo, hi = 1e-3, MAX_BUDGET if cfg.method == AdaptiveMethod.SAMPLE else 1.0
    got, stats = fraction(lo)
    if got > target:
        raise ConfigError(f"target_flops {target} is out of reach: the strongest setting gives {got:.3f}")
    for _ in range(12):  # the fraction grows with the strength
        mid = (lo + hi) / 2
        f, s = fraction(mid)
        if f <= target:
            lo, stats = mid, s
        else:
            hi = mid
    st.select = selector(model, cfg.method, lo)
    return lo, stats


def _rebuild(model: nn.Module, cfg: AdaptiveTokensConfig, state: dict[str, Any]) -> None:
    """The recorded strength (solved for ``target_flops`` when first applied)."""
    install(model, cfg, float(state["strength"]))


@register_transform(AdaptiveTokensConfig, rebuild=_rebuild)
def adaptive_tokens_(model: nn.Module, cfg: AdaptiveTokensConfig, ctx: TransformContext) -> dict[str, Any]:
    """Install adaptive token selection in place; records the resolved strength (and, when solved, the
    calibration images' token statistics)."""
    extra: dict[str, Any] = {}
    if cfg.target_flops is not None:
        if ctx.calib is None:
            raise ConfigError("adaptive_tokens with target_flops needs calibration images")
        strength, stats = solve_flops(model, cfg, ctx.calib)
        extra = {"calibration": stats}
    else:
        strength = float(cfg.budget if cfg.budget is not None else cfg.mass)  # type: ignore[arg-type]
        install(model, cfg, strength)
    depth = len(model.blocks)
    return {"method": str(cfg.method), "strength": strength,
            "layers": default_layers(depth) if cfg.layers is None else list(cfg.layers), **extra}


__all__ = ["AdaptiveMethod", "AdaptiveTokensConfig", "adaptive_tokens_", "is_adaptive", "measure", "token_trace",
           "trace_summary"]

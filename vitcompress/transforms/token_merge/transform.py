"""Token merging (ToMe) and pruning (EViT) for timm ViTs: the config, the schedules, the transform.

The blocks run as :class:`~.block.ReducibleBlock` (timm's own submodules; see ``block.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from ...bench import BenchConfig, compare, model_runner
from ...config import Config, StrEnum, upgrade_backend
from ...errors import ConfigError, note
from ...kernels._triton import Backend
from ...models import data_config
from ..registry import TransformContext, register_transform
from ..tokens import flops_fraction, model_dims, token_counts, tokens_per_layer
from . import ops
from .block import ReducibleBlock, TokenMethod, TokenState, install_blocks


class PropAttn(StrEnum):
    AUTO = "auto"  # on: merged tokens count as many keys as they stand for
    ON = "on"
    OFF = "off"


@dataclasses.dataclass
class TokenMergeConfig(Config):
    """Reduce tokens inside the blocks. Give exactly one strength:

    r: ToMe tokens merged per layer (tilted by ``inflection``: -1 = from 2r down to 0, ToMe's ``(r, -1)``);
    schedule: tokens removed in each layer, explicitly (either method);
    keep_rate: EViT fraction of patch tokens kept at each of ``layers`` (default depth x 1/4, 1/2, 3/4);
    target_flops: fraction of the unreduced GFLOPs, solved analytically;
    target_speedup: measured speedup at batch ``speed_batch`` in bf16 (solved by timing candidates).
    backend: how merged layers run proportional attention (inference): ``triton`` our fused kernel with
    ``log size`` as a per-key bias, ``torch`` SDPA with it as a float mask, ``auto`` triton on CUDA.
    """

    NAME = "token_merge"

    FAMILY = "token"
    VERSION = 4  # 2: attention (v1: auto); 3: evit is the paper's (older evit -> evit_wavg); 4: attention -> backend
    method: TokenMethod = TokenMethod.TOME
    r: float | None = None
    inflection: float = 0.0
    schedule: list[int] | None = None
    keep_rate: float | None = None
    layers: list[int] | None = None
    target_flops: float | None = None
    target_speedup: float | None = None
    speed_batch: int = 16
    prop_attn: PropAttn = PropAttn.AUTO
    backend: Backend = Backend.AUTO
    trace_source: bool = False

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Before v3, ``evit`` fused with the normalised (attention x size) average: that is ``evit_wavg`` now.
        Before v4 the kernel preference was called ``attention``."""
        data = {**data, "method": "evit_wavg"} if version < 3 and data.get("method") == "evit" else data
        return upgrade_backend(data, version, 4)

    def validate(self) -> None:
        if self.backend == Backend.BNB:
            raise ConfigError("backend must be one of: auto, torch, triton (bnb is for quantized layers)")
        given = [n for n in ("r", "schedule", "keep_rate", "target_flops", "target_speedup")
                 if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of r, schedule, keep_rate, target_flops, target_speedup"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.r is not None and (self.r < 0 or self.method != TokenMethod.TOME):
            raise ConfigError(f"r must be >= 0 and is for method tome (got r={self.r}, method={self.method})")
        if self.keep_rate is not None and (not 0 < self.keep_rate <= 1 or not self.method.is_evit):
            raise ConfigError(f"keep_rate must be in (0, 1] and is for method evit (got {self.keep_rate})")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise ConfigError(f"target_flops is a fraction of the base GFLOPs in (0, 1], got {self.target_flops}")
        if self.target_speedup is not None and self.target_speedup < 1:
            raise ConfigError(f"target_speedup must be >= 1, got {self.target_speedup}")
        if not -1 <= self.inflection <= 1:
            raise ConfigError(f"inflection must be in [-1, 1], got {self.inflection}")
        if self.schedule is not None and any(int(r) != r or r < 0 for r in self.schedule):
            raise ConfigError(f"schedule entries must be integers >= 0, got {self.schedule}")


# ---------------------------------------------------------------------------------------------- schedules
def check_schedule(model: nn.Module, schedule: list[int], method: TokenMethod) -> None:
    """Raise :class:`ConfigError` if any layer removes more tokens than it can (ToMe schedules are clamped
    first, see :func:`capped`, so this only refuses EViT's)."""
    n, p, _, _ = model_dims(model)
    if len(schedule) != len(model.blocks):
        raise ConfigError(f"schedule has {len(schedule)} entries but the model has {len(model.blocks)} blocks")
    for layer, (n_in, _) in enumerate(token_counts(n, schedule)):
        r, patches = schedule[layer], n_in - p
        limit = patches // 2 if method == TokenMethod.TOME else patches - 2
        if r > max(limit, 0):
            raise ConfigError(f"cannot remove {r} tokens in layer {layer}: it has {patches} mergeable tokens "
                              f"(at most {max(limit, 0)} for {method}); lower r / raise keep_rate")


def tome_schedule(model: nn.Module, r: float, inflection: float) -> list[int]:
    return ops.constant_schedule(r, len(model.blocks), inflection)


def capped(model: nn.Module, schedule: list[int]) -> list[int]:
    """``schedule`` with each layer's merges capped at half its mergeable tokens (ToMe's limit)."""
    n, p, _, _ = model_dims(model)
    out = []
    for r in schedule:
        out.append(min(r, (n - p) // 2))
        n -= out[-1]
    return out


def evit_schedule(model: nn.Module, keep_rate: float, layers: list[int] | None) -> list[int]:
    """Tokens removed per layer when EViT keeps ``keep_rate`` of the patch tokens at ``layers``."""
    n, p, _, _ = model_dims(model)
    depth = len(model.blocks)
    layers = default_evit_layers(depth) if layers is None else layers
    if any(not 0 <= layer < depth for layer in layers):
        raise ConfigError(f"EViT layers must be in [0, {depth - 1}], got {layers}")
    schedule = []
    for layer in range(depth):
        patches = n - p
        drop = 0
        if layer in layers and keep_rate < 1:
            drop = max(0, patches - ops.keep_count(patches, keep_rate) - 1)
        schedule.append(drop)
        n -= drop
    return schedule


def default_evit_layers(depth: int) -> list[int]:
    """EViT's locations: depth x 1/4, 1/2, 3/4 (layers 3, 6, 9 of 12, as in the paper's 4th/7th/10th)."""
    return sorted({min(depth - 1, int(depth * f + 0.5)) for f in (0.25, 0.5, 0.75)} - {0})  # shallow: in range


def solve_flops(model: nn.Module, cfg: TokenMergeConfig) -> list[int]:
    """The mildest schedule of the configured family whose analytic GFLOPs fraction <= target."""
    target = float(cfg.target_flops)  # type: ignore[arg-type]
    if cfg.method == TokenMethod.TOME:
        def family(s: float) -> list[int]:  # s: tokens merged per layer, capped where a layer has too few
            return capped(model, tome_schedule(model, s, cfg.inflection))
        strongest = float(model_dims(model)[0])
    else:
        def family(s: float) -> list[int]:  # s: fraction of patch tokens dropped at each EViT layer
            return evit_schedule(model, 1.0 - s, cfg.layers)
        strongest = 1.0 - 1e-6

    def feasible(s: float) -> bool:
        try:
            check_schedule(model, family(s), cfg.method)
            return True
        except ConfigError:
            return False

    strongest = _bisect(0.0, strongest, feasible, want_high=True)  # the most reduction the model allows
    best = flops_fraction(model, family(strongest))
    if best > target:
        raise ConfigError(f"target_flops {target} is out of reach for {cfg.method}: the most reduction possible "
                          f"gives {best:.3f}")
    return family(_bisect(0.0, strongest, lambda s: flops_fraction(model, family(s)) <= target, want_high=False))


def _bisect(lo: float, hi: float, ok, *, want_high: bool, steps: int = 40) -> float:
    """Monotone bisection. want_high: the largest s with ok(s) (ok true below a threshold);
    else the smallest s with ok(s) (ok true above it). Assumes ok holds at the returned end."""
    if want_high and ok(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ok(mid) == want_high:
            lo = mid
        else:
            hi = mid
    return lo if want_high else hi


def solve_speedup(model: nn.Module, cfg: TokenMergeConfig) -> tuple[list[int], float]:
    """Bisect the FLOPs target until the measured bf16 speedup at ``speed_batch`` reaches the target."""

    bench = BenchConfig()
    size = data_config(model)["input_size"]
    base = model_runner(model, cfg.speed_batch, size, bench)
    lo, hi, best, best_speed = 0.05, 1.0, None, 0.0  # GFLOPs fractions: the mildest that reaches the target
    for _ in range(6):
        mid = (lo + hi) / 2
        try:
            schedule = solve_flops(model, cfg.replace(target_speedup=None, target_flops=mid))
        except ConfigError:  # more reduction than the model allows: go milder
            lo = mid
            continue
        trial = copy.deepcopy(model)
        install(trial, schedule, cfg)
        got = compare(base, model_runner(trial, cfg.speed_batch, size, bench), device=bench.resolve_device(),
                      warmup=2, warmup_s=0.5, repeat=8)["speedup"]
        if got >= cfg.target_speedup:  # type: ignore[operator]
            best, best_speed, lo = schedule, got, mid
        else:
            hi = mid
    if best is None:
        raise ConfigError(f"target_speedup {cfg.target_speedup} was not reached even at {lo:.2f} of the GFLOPs")
    return best, best_speed


# ---------------------------------------------------------------------------------------------- transform
def install(model: nn.Module, schedule: list[int], cfg: TokenMergeConfig) -> None:
    """Switch the model's blocks to :class:`ReducibleBlock` with ``schedule`` (tokens removed per layer)."""
    if hasattr(model, "_vc_token_state"):
        raise ConfigError("this model already has token reduction; apply token_merge once")
    check_schedule(model, schedule, cfg.method)
    # auto: proportional attention for ToMe and our EViT variant; EViT itself does not use it
    prop_attn = cfg.prop_attn == PropAttn.ON or (cfg.prop_attn == PropAttn.AUTO and cfg.method != TokenMethod.EVIT)
    state = TokenState(protected=model.num_prefix_tokens, prop_attn=prop_attn,
                       method=cfg.method, trace_source=cfg.trace_source, backend=cfg.backend)
    install_blocks(model, state, schedule, [False] * len(schedule))


def _short(schedule: list[int]) -> str:
    """A schedule as a short list: [32, 16, 8, 0 x9]."""
    out: list[str] = []
    for r in schedule:
        if out and out[-1].split(" x")[0] == str(r):
            n = int(out[-1].split(" x")[1]) + 1 if " x" in out[-1] else 2
            out[-1] = f"{r} x{n}"
        else:
            out.append(str(r))
    return "[" + ", ".join(out) + "]"


def resolve_schedule(model: nn.Module, cfg: TokenMergeConfig) -> tuple[list[int], dict[str, Any]]:
    """The per-layer schedule ``cfg`` asks for, and anything measured on the way.

    ToMe clamps each layer to half the tokens it has left, as the reference does (so ViT-B's r=16 runs); the
    applied schedule is what is recorded, with the requested one beside it when the clamp changed it.
    """
    if cfg.method == TokenMethod.TOME and (cfg.schedule is not None or cfg.r is not None):
        if cfg.schedule is not None and len(cfg.schedule) != len(model.blocks):
            raise ConfigError(f"schedule has {len(cfg.schedule)} entries but the model has {len(model.blocks)} blocks")
        requested = [int(r) for r in cfg.schedule] if cfg.schedule is not None else \
            tome_schedule(model, cfg.r, cfg.inflection)
        applied = capped(model, requested)
        if applied != requested:  # the reference clamps silently; a user who asked for more should know
            note(f"ToMe: the schedule {_short(requested)} merges more tokens than the layers have; running "
                 f"{_short(applied)} (each layer merges at most half its tokens)")
        return applied, ({} if applied == requested else {"requested_schedule": requested})
    if cfg.schedule is not None:
        return [int(r) for r in cfg.schedule], {}
    if cfg.keep_rate is not None:
        return evit_schedule(model, cfg.keep_rate, cfg.layers), {}
    if cfg.target_flops is not None:
        return solve_flops(model, cfg), {}
    schedule, speedup = solve_speedup(model, cfg)
    return schedule, {"measured_speedup": round(speedup, 3), "speed_batch": cfg.speed_batch}


def _rebuild(model: nn.Module, cfg: TokenMergeConfig, state: dict[str, Any]) -> None:
    """The recorded schedule (an empty record, from older files, resolves it again from the config)."""
    install(model, state["schedule"] if state else resolve_schedule(model, cfg)[0], cfg)


@register_transform(TokenMergeConfig, rebuild=_rebuild)
def token_merge_(model: nn.Module, cfg: TokenMergeConfig, ctx: TransformContext) -> dict[str, Any]:
    """Apply token merging / pruning in place; records the per-layer schedule it resolved."""
    schedule, extra = resolve_schedule(model, cfg)
    install(model, schedule, cfg)
    n, _, _, _ = model_dims(model)
    return {"schedule": schedule, "tokens": [a for a, _ in token_counts(n, schedule)],
            "flops_fraction": round(flops_fraction(model, schedule), 4), **extra}


__all__ = ["PropAttn", "ReducibleBlock", "TokenMergeConfig", "TokenMethod", "token_merge_", "tokens_per_layer"]

"""The quantization config: every PTQ setting as versioned, validated fields (str-Enums for the choices)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...config import Config, StrEnum
from ...errors import ConfigError
from ...kernels._triton import Backend
from ...kernels.tuned import table_for


class Mode(StrEnum):
    SIMULATE = "simulate"
    DEPLOY = "deploy"


class WeightGranularity(StrEnum):
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ActGranularity(StrEnum):
    PER_TENSOR = "per_tensor"  # static, calibrated
    PER_TOKEN = "per_token"  # dynamic


class Rounding(StrEnum):
    RTN = "rtn"  # round to nearest
    BRECQ = "brecq"  # BRECQ as published: weights' rounding, then activation steps, summed losses (.brecq)
    BRECQ_JOINT = "brecq_joint"  # the earlier variant: rounding and steps learned jointly, averaged losses
    GPTQ = "gptq"  # error-compensating, from calibration Hessians


BRECQS = (Rounding.BRECQ, Rounding.BRECQ_JOINT)


class Reparam(StrEnum):
    NONE = "none"
    REPQ = "repq"  # RepQ-ViT: fold post-LayerNorm channel-wise ranges into the LayerNorm and the next Linear
    SMOOTHQUANT = "smoothquant"  # SmoothQuant: migrate max|X_j|^alpha / max|W_j|^(1-alpha) into the weights


class Observer(StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    PTQ4VIT = "ptq4vit"  # every layer's weight and input scales searched (PTQ4ViT; search_metric picks the loss)
    ADALOG = "adalog"  # the weights as ptq4vit, each input grid by AdaLog's FPCS (scale and zero point)


SEARCHED = (Observer.PTQ4VIT, Observer.ADALOG)  # observers that search each layer's scales (search.py)
NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' 4-bit quantizer takes


class SoftmaxQuant(StrEnum):
    NONE = "none"
    UNIFORM = "uniform"
    LOG2 = "log2"
    LOGSQRT2 = "logsqrt2"
    ADALOG = "adalog"  # log grid with a base searched per layer (AdaLog)
    TWIN = "twin"  # PTQ4ViT's twin uniform ranges


class SearchMetric(StrEnum):
    MSE = "mse"  # squared error of the quantized probabilities
    HESSIAN = "hessian"  # PTQ4ViT: attention-output error weighted by the task loss's squared gradient


class PostGelu(StrEnum):
    UNIFORM = "uniform"  # the fc2 input on the asymmetric grid like any activation
    TWIN = "twin"  # PTQ4ViT's twin uniform ranges (negative / positive), R2's top searched per layer
    ADALOG = "adalog"  # AdaLog: shifted by GELU's minimum (the bias reparameterization), log base searched


class QuantDtype(StrEnum):
    INT = "int"
    FP8 = "fp8_e4m3"


@dataclasses.dataclass
class QuantConfig(Config):
    """w_bits / a_bits: 2..8, or None to leave weights / activations in floating point.

    layers / exclude: module names, aliases (qkv, proj, fc1, fc2, head, attn_matmul, patch_embed), globs,
    or ``re:REGEX``. observer: how ranges are picked (weights: minmax or mse clip; activations: minmax, percentile,
    mse); ptq4vit and adalog search each Linear's weight and input scales together on its output (:mod:`.search`).
    softmax: the quantizer of the attention probabilities (needs the attn_matmul layers).
    post_gelu: the quantizer of the MLP's post-GELU activations (the fc2 input): uniform, twin (PTQ4ViT) or adalog.
    search_metric: what the searched quantizers (adalog's base, the twins' ranges, observer ptq4vit's scales)
    minimise on the calibration images: mse (the quantized tensor's or the next layer's squared error) or hessian
    (PTQ4ViT's Hessian-guided metric: the output error weighted by the task loss's squared gradient).
    dtype: int grids, or fp8_e4m3 (W8A8 with float8 e4m3 weights and activations).
    backend (deploy): auto, torch, triton (the int8 GEMM) or bnb (bitsandbytes: w8 LLM.int8, w4 NF4).
    dense_fallback (deploy, W8A8): a GPU architecture with a GEMM table (``sm90``): a layer whose quantized GEMM that
    table measured slower than bf16 at ``dense_fallback_rows`` rows (batch x tokens) stays bf16; the artifact
    records which (``kept_dense``).
    a_symmetric (deploy, int8): activation grids symmetric about 0 (+-127), as TensorRT requires; by default each
    grid spans its range (static: the calibrated one, with its zero point; per token: each row's own), which on
    DINOv2 ViT-S/14 cuts the logit error of W8A8 from 12.8 to 7.7 % (static) and 6.0 to 4.3 % (per token): the
    fc2 inputs are GELU outputs, mostly positive.
    """

    NAME = "quantize"

    FAMILY = "quant"
    VERSION = 7  # v2 added softmax and dtype; v3 gptq_sequential and act_order (older dicts: one-pass GPTQ);
    # v4 search_metric and post_gelu (older dicts: mse and uniform, what they ran); v5 brecq is the published
    # two-stage method (older brecq dicts ran the joint variant: brecq_joint) and recon_fisher; v6 reparam
    # smoothquant and smooth_alpha (older dicts: no smoothing, what they ran); v7 a_symmetric (older dicts: True,
    # the symmetric grid they deployed)
    w_bits: int | None = 8
    a_bits: int | None = 8
    w_granularity: WeightGranularity = WeightGranularity.PER_CHANNEL
    group_size: int = 64
    a_granularity: ActGranularity = ActGranularity.PER_TENSOR
    observer: Observer = Observer.MINMAX
    percentile: float = 99.99
    layers: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    exclude: list[str] = dataclasses.field(default_factory=list)
    calib_size: int = 32
    mode: Mode = Mode.SIMULATE
    rounding: Rounding = Rounding.RTN
    gptq_damp: float = 0.01
    gptq_sequential: bool = True
    act_order: bool = False
    recon_iters: int = 1000  # brecq: optimisation steps per block (and per stage)
    recon_fisher: bool = False  # brecq: weight the reconstruction error by the squared Fisher diagonal
    reparam: Reparam = Reparam.NONE
    smooth_alpha: float = 0.5
    softmax: SoftmaxQuant = SoftmaxQuant.NONE
    post_gelu: PostGelu = PostGelu.UNIFORM
    search_metric: SearchMetric = SearchMetric.MSE
    dtype: QuantDtype = QuantDtype.INT
    backend: Backend = Backend.AUTO
    dense_fallback: str | None = None
    dense_fallback_rows: int = 12608  # batch 64 x 197 tokens (ViT-B/16)
    a_symmetric: bool = False

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """v1/v2 collected every GPTQ Hessian in one pass over the float model: say so in the upgraded dict. Before
        v5, brecq was the joint variant."""
        data = {**data, "gptq_sequential": False} if version < 3 else data
        data = {**data, "a_symmetric": True} if version < 7 else data
        return {**data, "rounding": "brecq_joint"} if version < 5 and data.get("rounding") == "brecq" else data

    def report_fields(self) -> dict[str, Any]:
        return {"w_bits": self.w_bits} if self.w_bits else {}

    @property
    def deployable(self) -> bool:
        return self.mode != Mode.SIMULATE  # simulate = fake quantization in floating point, an accuracy study

    @property
    def exportable(self) -> bool:
        return self.deployable and self.a_granularity != ActGranularity.PER_TOKEN  # QDQ holds one scale per tensor

    def validate(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits is not None and (int(bits) != bits or not 2 <= bits <= 8):
                raise ConfigError(f"{name} must be an integer from 2 to 8 (or none), got {bits}")
        if self.group_size < 1 or self.calib_size < 1:
            raise ConfigError(f"group_size and calib_size must be >= 1 (got {self.group_size}, {self.calib_size})")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not self.layers:
            raise ConfigError("no layers to quantize")
        if self.dense_fallback is not None:
            if self.mode != Mode.DEPLOY or self.deploy_kind not in ("int8", "fp8"):
                raise ConfigError("dense_fallback chooses between a W8A8 GEMM and bf16: it needs --mode deploy with "
                                  "int8 or fp8 W8A8")
            if table_for(self.dense_fallback) is None:
                raise ConfigError(f"no GEMM table for '{self.dense_fallback}' (vitcompress/kernels/tuned/"
                                  f"{self.dense_fallback}.json): measure one on that GPU with python -m "
                                  "vitcompress.kernels.tune")
            if self.dense_fallback_rows < 1:
                raise ConfigError(f"dense_fallback_rows must be >= 1, got {self.dense_fallback_rows}")
        if not 0 <= self.smooth_alpha <= 1:
            raise ConfigError(f"smooth_alpha is SmoothQuant's migration strength in [0, 1], got {self.smooth_alpha}")
        if self.reparam == Reparam.SMOOTHQUANT and self.a_bits is None:
            raise ConfigError("smoothquant migrates activation outliers into the weights: it needs a_bits")
        if self.reparam == Reparam.REPQ and not self.static_acts:
            raise ConfigError("repq reparameterizes for static per-tensor activations: it needs a_bits and "
                              "a_granularity per_tensor")
        if self.act_order and self.rounding != Rounding.GPTQ:
            raise ConfigError("act_order is a GPTQ option (rounding gptq)")
        if self.rounding in (Rounding.GPTQ, *BRECQS) and self.w_bits is None:
            raise ConfigError(f"{self.rounding} rounds weights: it needs w_bits")
        if self.rounding in BRECQS and (self.mode != Mode.SIMULATE or self.dtype != QuantDtype.INT):
            raise ConfigError("brecq (block reconstruction) runs in --mode simulate on integer grids")
        if self.recon_iters < 1:
            raise ConfigError(f"recon_iters must be >= 1, got {self.recon_iters}")
        if self.softmax != SoftmaxQuant.NONE and self.a_bits is None:
            raise ConfigError("the softmax quantizer uses a_bits: set a_bits")
        if self.search_metric != SearchMetric.MSE and self.softmax not in (SoftmaxQuant.ADALOG, SoftmaxQuant.TWIN) \
                and self.post_gelu == PostGelu.UNIFORM and self.observer not in SEARCHED:
            raise ConfigError("search_metric applies to the searched quantizers: softmax / post_gelu adalog or "
                              "twin, observer ptq4vit")
        if self.observer in SEARCHED and (self.dtype != QuantDtype.INT or self.group is not None):
            raise ConfigError(f"observer {self.observer} searches integer per-channel weight grids and per-tensor "
                              "inputs")
        if self.post_gelu != PostGelu.UNIFORM and not (self.static_acts and self.mode == Mode.SIMULATE and
                                                   self.dtype == QuantDtype.INT and self.rounding not in BRECQS):
            raise ConfigError(f"post_gelu {self.post_gelu} is a static integer grid in --mode simulate (a_bits, "
                              "per_tensor; not with rounding brecq, whose step sizes are uniform)")
        if self.dtype == QuantDtype.FP8 and (self.w_bits != 8 or self.a_bits not in (8, None)
                                            or self.w_granularity != WeightGranularity.PER_CHANNEL):
            raise ConfigError("fp8_e4m3 is 8-bit with per-channel weights: w_bits 8, a_bits 8 or none")
        if self.backend != "auto" and self.mode != Mode.DEPLOY:
            raise ConfigError("--backend picks how --mode deploy executes; simulate runs in floating point")
        if self.mode == Mode.DEPLOY:
            self._validate_deploy()

    def _validate_deploy(self) -> None:
        kind = self.deploy_kind
        if kind is None:
            raise ConfigError("mode deploy executes int W8A8 (per-channel), fp8_e4m3 W8A8, weight-only int8/int4 "
                              f"(a_bits none) or --backend bnb (w8 a8 / w4); got w_bits={self.w_bits}, "
                              f"a_bits={self.a_bits}, {self.w_granularity}, {self.dtype} (other widths: simulate)")
        if self.rounding == Rounding.GPTQ and kind != "weight_only":
            raise ConfigError("gptq is deployed weight-only (a_bits none); with activations, use --mode simulate")
        if kind == "bnb_nf4" and self.group_size not in NF4_BLOCKS:
            raise ConfigError(f"bitsandbytes NF4 takes blocks (--group-size) of {', '.join(map(str, NF4_BLOCKS))}; "
                              f"got {self.group_size}")
        if self.backend == "triton" and kind not in ("int8", "fp8"):
            raise ConfigError(f"--backend triton runs the int8 and fp8 W8A8 GEMMs; {kind} runs through torch")
        if self.softmax not in (SoftmaxQuant.NONE, SoftmaxQuant.UNIFORM) or (
                self.softmax == SoftmaxQuant.UNIFORM and (kind != "int8" or "attn_matmul" not in self.layers)):
            raise ConfigError("deployed softmax quantization is the uniform 8-bit grid of int8 attention matmuls "
                              "(layers with attn_matmul, exported as QDQ); other softmax quantizers are simulate-only")

    @property
    def deploy_kind(self) -> str | None:
        """int8, fp8, weight_only, bnb_int8, bnb_nf4, or None when no deployed format fits."""
        w, a, per_channel = self.w_bits, self.a_bits, self.w_granularity == WeightGranularity.PER_CHANNEL
        if self.backend == "bnb":
            ok = self.dtype == QuantDtype.INT and self.reparam == Reparam.NONE and self.rounding == Rounding.RTN
            return {(8, 8): "bnb_int8", (4, None): "bnb_nf4"}.get((w, a)) if ok else None
        if self.dtype == QuantDtype.FP8:
            return "fp8" if a == 8 else None
        if a is None and w in (4, 8):
            return "weight_only"
        return "int8" if (w, a) == (8, 8) and per_channel else None

    @property
    def static_acts(self) -> bool:
        return self.a_bits is not None and self.a_granularity == ActGranularity.PER_TENSOR \
            and self.deploy_kind != "bnb_int8"  # LLM.int8 quantizes activations itself

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges, RepQ, SmoothQuant and GPTQ are all computed from calibration images."""
        return self.static_acts or self.rounding != Rounding.RTN or self.reparam != Reparam.NONE

    @property
    def group(self) -> int | None:
        return self.group_size if self.w_granularity == WeightGranularity.PER_GROUP else None

"""Evaluation: accuracy, fidelity to a reference, speed, memory and size of one model on one dataset.

``evaluate`` returns a flat dict with at least: top1, top5 (percent, None without labels), agreement
(percent of images whose top-1 equals the reference's), kl (mean KL(reference || model)), latency_ms per
batch size (median, p95), throughput, peak_mem_mb, params, gflops, size_mb, device, dtype and versions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .bench import (
    BenchConfig,
    Dtype,
    compile_options,
    count_flops,
    peak_memory_mb,
    serialized_size_mb,
    time_model,
)
from .bench.timing import attention_backend
from .data import ImageData, load_data
from .errors import DataError, check_positive
from .export import RuntimeModel
from .models import data_config, model_info
from .pipeline import load_base
from .provenance import run_context
from .robustness import AttackConfig, AttackSource, attack_eval
from .transforms.tokens import token_state
from .ui import progress_bar


@torch.inference_mode()
def predict(model: nn.Module, data: ImageData, *, batch_size: int = 64, cfg: BenchConfig | None = None,
            progress: bool = False, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N,C] (float32, CPU), labels [N] (-1: none) and group ids [N] for every image of ``data``.

    Under torchrun each rank runs whole batches of the single-process partition and the results are
    gathered back into order on every rank (see :mod:`vitcompress.distributed`).
    """

    check_positive("batch size", batch_size)
    cfg = cfg or BenchConfig()
    device = cfg.resolve_device()
    model = model.to(device).eval()
    dtype: Dtype | None = None  # auto: measured for this model at the first batch's shape (cached per machine)
    rank, size = distributed.shard()
    batch_ids, items = distributed.batch_indices(len(data), batch_size, rank, size) if size > 1 else (None, None)
    loader = data.loader(batch_size, workers=workers, indices=items)
    outs = []
    with attention_backend(model, cfg.sdpa), progress_bar(progress, len(loader), f"eval {data.name}") as tick:
        for x, y, g in loader:
            x = x.to(device)
            dtype = dtype or cfg.dtype.on(device, model, _probe(model, x))
            with torch.autocast(device.type, dtype=dtype.torch, enabled=dtype != Dtype.FP32):
                out = forward(model, x)
            outs.append(torch.cat([out.float().cpu(), y[:, None].float(), g[:, None].float()], 1))
            tick()
    if size > 1:
        outs = distributed.reassemble(distributed.gather((batch_ids, outs)))
    merged = torch.cat(outs) if outs else torch.zeros(0, 3)
    return merged[:, :-2].contiguous(), merged[:, -2].long(), merged[:, -1].long()


def _probe(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The batch that ``dtype: auto`` times the model on: what :func:`forward` gives it (whole clips to a stateful
    model, whose every call then starts from a reset; a clip's frames as one batch to any other)."""
    stateful = getattr(model, "_vc_stateful", False)
    if stateful and x.dim() != 5:
        raise DataError("an Eventful model is stateful: it runs the frames of videos in order (a video: data spec), "
                        "not a batch of separate images")
    return x.flatten(0, 1) if x.dim() == 5 and not stateful else x


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits [B,K] of images x [B,3,H,W], or of clips x [B,T,3,H,W] (the mean of their frames' logits: a
    stateful model (Eventful) runs each clip's frames in order, any other model each frame on its own)."""
    out = model(_probe(model, x))  # _probe refuses separate images for a stateful model
    # clips: a stateful model returns [B,T,K], any other [B*T,K]
    return out.reshape(*x.shape[:2], -1).mean(1) if x.dim() == 5 else out


def predict_traced(model: nn.Module, data: ImageData, **kwargs: Any,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """:func:`predict`, plus the token statistics of an adaptive-token model (None for any other)."""
    st = token_state(model)  # a token family's state: it says whether counts vary per image
    if st is None or not st.adaptive or st.summarize is None:
        return (*predict(model, data, **kwargs), None)
    with st.tracing(len(model.blocks)) as forwards:
        out = predict(model, data, **kwargs)
    return (*out, st.summarize(model, forwards) if forwards else None)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None,
                     ) -> dict[str, float | int | None]:
    """top1/top5 (percent; None without labels), agreement and kl against ``ref_logits`` (None without)."""
    n = len(logits)
    out: dict[str, float | int | None] = {"n_images": n, "top1": None, "top5": None, "agreement": None, "kl": None}
    if n and bool((labels >= 0).all()):
        out["top1"] = 100.0 * (logits.argmax(1) == labels).float().mean().item()
        if logits.shape[1] >= 5:
            out["top5"] = 100.0 * (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    if n and ref_logits is not None:
        out["agreement"] = 100.0 * (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item()
        log_p, log_q = F.log_softmax(ref_logits, 1), F.log_softmax(logits, 1)
        out["kl"] = (log_p.exp() * (log_p - log_q)).sum(1).mean().item()
    return out


def evaluate(model: nn.Module, data: ImageData, *, reference: nn.Module | str | None = "auto",
             batch_size: int = 64, bench: BenchConfig | None = None, speed: bool = True,
             progress: bool = False, workers: int = 0, attack: AttackConfig | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``.

    reference: a model to measure agreement/kl against; ``"auto"`` uses the model's uncompressed base when
    known (a model with no transforms is its own reference); None skips fidelity metrics.
    speed: also time the model at ``bench.batch_sizes`` and measure peak memory.
    attack: also measure robust top-1 under this attack (``result["attack"]``, see :mod:`vitcompress.robustness`).
    """

    bench = bench or BenchConfig()
    if isinstance(model, RuntimeModel):  # the runtime runs fp32 on the CPU; the reference is compared there too
        bench = dataclasses.replace(bench, device="cpu", dtype=Dtype.FP32)
    logits, labels, groups, tokens = predict_traced(model, data, batch_size=batch_size, cfg=bench,
                                                    progress=progress, workers=workers)
    if reference == "auto":
        reference = load_base(model)
    ref_logits = None
    if reference is model:
        ref_logits = logits
    elif isinstance(reference, nn.Module):
        ref_cfg = data_config(reference)
        ref_data = data if ref_cfg == data_config(model) else data.for_config(ref_cfg)
        ref_logits = predict(reference, ref_data, batch_size=batch_size, cfg=bench, progress=progress,
                             workers=workers)[0]

    result: dict[str, Any] = {"model": _describe_model(model), "data": data.describe(), "reference": (
        None if ref_logits is None else "self" if reference is model else _describe_model(reference))}
    result.update(accuracy_metrics(logits, labels, ref_logits))
    if len(data.groups) > 1:
        result["groups"] = {
            name: accuracy_metrics(logits[groups == gi], labels[groups == gi],
                                   None if ref_logits is None else ref_logits[groups == gi])
            for gi, name in enumerate(data.groups) if bool((groups == gi).any())
        }
    if attack is not None:
        base = load_base(model) if attack.source == AttackSource.BASE else None
        result["attack"] = attack_eval(model, data, attack, base=base, batch_size=batch_size, bench=bench)
    result.update(static_metrics(model))
    stateful = getattr(model, "_vc_stateful", False)
    if stateful:
        result["gflops_note"] = ("a frame after a stream's first (top-k: exact; threshold: the first frame's, all "
                                 "tokens); python -m benchmarks.eventful counts them on clips")
    if tokens is not None:  # per-image counts: GFLOPs are the mean over the images that ran
        result.update(tokens=tokens, gflops=tokens["gflops_mean"], gmacs=tokens["gflops_mean"] / 2,
                      gflops_note="mean per image over the data (adaptive token counts)")
    if speed and distributed.is_main():  # under torchrun only rank 0 times (the others would contend)
        result.update(speed_metrics(model, bench))
    result.update({"dtype": str(accuracy_dtype(model, data, batch_size, bench)), "sdpa": bench.sdpa,
                   "compile": bench.compile,
                   **run_context(bench.resolve_device())})
    if bench.compile and not isinstance(model, RuntimeModel):  # how it compiled: graphs or not, and why
        opts = compile_options(model, bench.resolve_device(), bench.compile_mode)
        result["compiled"] = {"mode": str(bench.compile_mode), "fullgraph": opts["fullgraph"],
                              "cuda_graphs": opts["options"]["triton.cudagraphs"],
                              "static_shapes": opts["fullgraph"]}  # fullgraph exactly where shapes are static
    return result


def accuracy_dtype(model: nn.Module, data: ImageData, batch_size: int, bench: BenchConfig) -> Dtype:
    """The dtype the accuracy pass ran in (``auto`` resolved for this model at its batch shape, as predict did)."""
    device = bench.resolve_device()
    if isinstance(model, RuntimeModel) or bench.dtype != Dtype.AUTO or device.type != "cpu" or not len(data):
        return bench.dtype.on(device)
    example = torch.zeros(min(batch_size, len(data)), *data.dataset[0][0].shape)  # an image or a clip
    return bench.dtype.on(device, model, _probe(model, example))


def static_metrics(model: nn.Module) -> dict[str, Any]:
    """params, gflops/gmacs per image (attention included) and size on disk in MiB."""
    if isinstance(model, RuntimeModel):  # an exported file: what its metadata records, and the file's size
        return model.static_metrics()
    input_size = data_config(model)["input_size"]
    reset = getattr(model, "reset", None) if getattr(model, "_vc_stateful", False) else None
    if reset is not None:  # a stateful model counts a stream's first frame; its layers say what later frames skip
        reset()
    # what a dense count of a layer overstates (sparse attention's skipped tiles, Eventful's gated tokens), declared by
    # the layer's family
    flops = count_flops(model, input_size) - sum(m.flops_saved(model) for m in model.modules()
                                                  if hasattr(m, "flops_saved"))
    if reset is not None:
        reset()
    return {"params": count_params(model), "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "size_mb": serialized_size_mb(model)}


def count_params(model: nn.Module) -> int:
    """Every weight the model holds, whatever its dtype: the float parameters, plus the weights that deployed
    low-precision layers keep as int8 / fp8 / int4 codes in buffers (a linear layer whose weight is not a
    parameter counts in x out, and its bias when that is a buffer too)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, nn.Linear) \
                and not isinstance(getattr(m, "weight", None), nn.Parameter):
            bias = getattr(m, "bias", None)
            n += m.in_features * m.out_features + (bias.numel() if isinstance(bias, torch.Tensor)
                                                   and not isinstance(bias, nn.Parameter) else 0)
    return n


def speed_metrics(model: nn.Module, bench: BenchConfig) -> dict[str, Any]:
    """latency_ms per batch size, throughput (images/s) at the largest, and its peak memory."""
    input_size = data_config(model)["input_size"]
    lat = time_model(model, input_size, bench)
    largest = str(max(bench.batch_sizes))
    return {"latency_ms": {bs: {"median": v["median_ms"], "p95": v["p95_ms"], "dtype": v["dtype"]}
                           for bs, v in lat.items()},
            "throughput": lat[largest]["throughput"],
            "throughput_by_batch": {bs: v["throughput"] for bs, v in lat.items()},
            "peak_mem_mb": peak_memory_mb(model, int(largest), input_size, bench), "peak_mem_batch": int(largest)}


def _describe_model(model: nn.Module) -> dict[str, Any]:
    info = model_info(model)
    return {"arch": info.arch, "source": info.source, "transforms": [t["name"] for t in info.transforms],
            "random_weights": bool(info.provenance.get("random_weights"))}


def evaluate_spec(model: nn.Module, data: str, *, split: str | None = None, limit: int | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate` on the data spec ``data`` (its eval split unless ``split``), preprocessed for ``model``;
    ``world_size`` records how many processes shared the pass."""
    check_positive("limit", limit)
    result = evaluate(model, load_data(data, data_config(model), split=split, limit=limit), **kwargs)
    result["world_size"] = distributed.shard()[1]
    return result

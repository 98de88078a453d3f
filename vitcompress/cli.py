"""The ``vitcompress`` command line: a thin layer over the library.

Options default to None and are passed on only when given, so every default lives in the library's
configs. User errors (:class:`~vitcompress.errors.UserError`, click usage errors) print one line on
stderr and exit non-zero, with no traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from . import (
    cli_tokens,  # noqa: F401  (registers merge, adapt, learn-merge, sparse-attn)
    distributed,
)
from .artifact import check_writable
from .bench import BenchConfig
from .cli_common import (
    CalibDataOpt,
    CalibSizeOpt,
    ModelArg,
    OutOpt,
    _calibration,
    _CliError,
    _given,
    _ints,
    _model,
    _needs_calibration,
    _runtime_model,
    _split,
    app,
    model_options,
)
from .cli_output import print_eval, print_fronts, print_records, print_table
from .demo import run_demo
from .errors import ConfigError, UserError
from .evaluate import evaluate_spec
from .export import ExportConfig, export_model
from .io import atomic_write_json
from .pipeline import compress_to, create_model
from .recipes import recipe_path
from .report import write_report
from .robustness import AttackConfig
from .sweep import run_sweep
from .train import load_recipe, recipe_config
from .train import train as run_train
from .transforms import BlockSparseConfig, MixedPrecisionConfig, PruneConfig, QuantConfig, RecoveryConfig


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML (a path, or a bundled name: digits_vit)."),
    out: Path = OutOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
    seed: int | None = typer.Option(None, "--seed", help="Override the recipe's seed."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    limit: int | None = typer.Option(None, "--limit", help="Train on this many images."),
    data: str | None = typer.Option(None, "--data", help="Override the recipe's training data (spec or path)."),
    eval_data: str | None = typer.Option(None, "--eval-data", help="Override the recipe's eval data; none to skip."),
    dtype: str | None = typer.Option(None, "--dtype", help="Override the recipe's dtype: auto, bf16, fp16 or fp32."),
) -> None:
    """Train or fine-tune a classifier from a recipe and save it as an artifact."""
    doc = load_recipe(recipe_path(recipe))
    cfg = recipe_config(doc, **_given(epochs=epochs, seed=seed, device=device, limit=limit, data=data, dtype=dtype,
                                      eval_data=eval_data))
    check_writable(out)
    _, metrics = run_train(cfg, out, progress=sys.stderr.isatty(), recipe=doc)
    print_table("train", {"artifact": str(out), **metrics})


@app.command("eval")
@model_options
def eval_(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", help="digits, digits-c, synthetic[:N], hf:NAME[:SPLIT] or a directory."),
    split: str | None = typer.Option(None, "--split", help="Dataset split."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate this many images (evenly spaced)."),
    reference: str | None = typer.Option(
        None, "--reference", help="Model for agreement/kl; 'none' to skip. Default: the model's uncompressed base."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of the accuracy pass."),
    bench_batch_sizes: str | None = typer.Option(
        None, "--bench-batch-sizes", help="Latency batch sizes, e.g. 1,16,64."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, bf16, fp16 or fp32 (autocast)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    compile_: bool | None = typer.Option(
        None, "--compile", help="Time the compiled deploy path (fullgraph, frozen weights, CUDA graphs on a GPU)."),
    compile_mode: str | None = typer.Option(None, "--compile-mode", help="default or max-autotune."),
    repeat: int | None = typer.Option(None, "--repeat", help="Timed repetitions per batch size."),
    no_speed: bool | None = typer.Option(None, "--no-speed", help="Skip latency and memory."),
    json_out: Path | None = typer.Option(None, "--json", help="Write all metrics to this JSON file."),
    no_verify: bool | None = typer.Option(
        None, "--no-verify", help="Run MODEL without checking its weights against their recorded SHA-256."),
    workers: int | None = typer.Option(None, "--workers", help="Data-loading worker processes."),
    runtime: str | None = typer.Option(
        None, "--runtime", help="Exported files: onnxruntime or openvino (.onnx), torch (.pt2)."),
    runtime_opts: list[str] | None = typer.Option(
        None, "--runtime-opts", help="KEY=VALUE (repeatable): an ORT SessionOptions field or an OpenVINO property."),
    attack: str | None = typer.Option(None, "--attack", help="Also measure robust top-1: fgsm or pgd."),
    eps: str | None = typer.Option(None, "--eps", help="Attack radius in pixels, e.g. 2/255."),
    steps: int | None = typer.Option(None, "--steps", help="PGD steps."),
    attack_source: str | None = typer.Option(None, "--attack-source", help="self (white-box) or base (transfer)."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Accuracy, agreement with a reference, latency, memory, size and GFLOPs of MODEL on --data.

    MODEL may be an exported .onnx/.pt2 file: its agreement is then measured against the artifact it came from."""
    bench = BenchConfig(**_given(dtype=dtype, device=device, compile=compile_, compile_mode=compile_mode, repeat=repeat,
                                 batch_sizes=_ints(bench_batch_sizes, "--bench-batch-sizes")))
    m = _runtime_model(model, runtime, runtime_opts, verify=not no_verify) or \
        _model(model, **(model_opts or {}), verify=not no_verify)
    ref: Any = "auto" if reference is None else None if reference.lower() == "none" else create_model(reference)
    attack_fields = _given(eps=eps, steps=steps, source=attack_source)
    if attack_fields and attack is None:
        raise ConfigError("--eps / --steps / --attack-source need --attack fgsm|pgd")
    atk = None if attack is None else AttackConfig(method=attack, **attack_fields)
    with distributed.session(bench.resolve_device()):  # data-parallel under torchrun; a no-op otherwise
        result = evaluate_spec(m, data, split=split, limit=limit, reference=ref, bench=bench, speed=not no_speed,
                               progress=sys.stderr.isatty() and distributed.is_main(),
                               attack=atk, **_given(batch_size=batch_size, workers=workers))
        if not distributed.is_main():
            return
    if json_out is not None:
        atomic_write_json(json_out, result)
    print_eval(result)


@app.command()
@model_options
def prune(
    model: str = ModelArg,
    out: Path = OutOpt,
    heads: float | None = typer.Option(None, "--heads", help="Fraction of attention heads removed."),
    mlp: float | None = typer.Option(None, "--mlp", help="Fraction of MLP hidden channels removed."),
    sparsity: float | None = typer.Option(None, "--sparsity", help="Block sparsity: the fraction of blocks removed."),
    block_size: int | None = typer.Option(None, "--block-size", help="Block edge B (BxB tiles)."),
    criterion: str | None = typer.Option(None, "--criterion", help="magnitude, taylor or hessian."),
    scope: str | None = typer.Option(None, "--scope", help="Heads/MLP ranking: global or per_layer."),
    calib_data: str | None = CalibDataOpt,
    calib_size: int | None = CalibSizeOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Recovery: fine-tuning epochs after pruning."),
    data: str | None = typer.Option(None, "--data", help="Recovery: fine-tuning data (its train split)."),
    distill: str | None = typer.Option(None, "--distill", help="Recovery loss: soft (KL), hard (DeiT) or none."),
    attn_only: bool | None = typer.Option(None, "--attn-only", help="Recovery: fine-tune only the attention."),
    lr: float | None = typer.Option(None, "--lr", help="Recovery: learning rate."),
    device: str | None = typer.Option(None, "--device", help="Recovery: auto, cpu or cuda[:N]."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Structured (heads, MLP width) and block-structured pruning, with optional distillation recovery."""
    common = _given(criterion=criterion, calib_size=calib_size)
    stack: list[Any] = [PruneConfig(**_given(heads=heads, mlp=mlp, scope=scope), **common)] \
        if heads is not None or mlp is not None else []
    if block_size is not None and sparsity is None:
        raise ConfigError("--block-size needs --sparsity (the fraction of blocks removed)")
    stack += [BlockSparseConfig(**_given(sparsity=sparsity, block_size=block_size), **common)] \
        if sparsity is not None else []
    if not stack:
        raise ConfigError("give --heads, --mlp and/or --sparsity")
    recovery = _given(epochs=epochs, data=data, distill=distill, attn_only=attn_only, lr=lr, device=device)
    stack += [RecoveryConfig(**recovery)] if recovery else []
    _needs_calibration(stack, calib := _calibration(calib_data, calib_size))
    m = _model(model, **(model_opts or {}))
    print_records("prune", out, compress_to(out, m, stack, calib=calib))


@app.command()
@model_options
def quantize(
    model: str = ModelArg,
    out: Path = OutOpt,
    w_bits: str | None = typer.Option(None, "--w-bits", help="Weight bits 2..8, or none."),
    a_bits: str | None = typer.Option(None, "--a-bits", help="Activation bits 2..8, or none."),
    mode: str | None = typer.Option(None, "--mode", help="simulate (any width) or deploy (runs low precision)."),
    observer: str | None = typer.Option(None, "--observer", help="Activation ranges: minmax, percentile or mse."),
    rounding: str | None = typer.Option(None, "--rounding", help="Weight rounding: rtn, gptq or brecq."),
    recon_iters: int | None = typer.Option(None, "--recon-iters", help="brecq: optimisation steps per block."),
    act_order: bool | None = typer.Option(
        None, "--act-order/--no-act-order", help="gptq: quantize columns in decreasing Hessian diagonal."),
    gptq_sequential: bool | None = typer.Option(
        None, "--gptq-sequential/--gptq-one-pass",
        help="gptq: each layer's Hessian from the already quantized model (sequential) or the float one."),
    gptq_damp: float | None = typer.Option(None, "--gptq-damp", help="gptq: Hessian damping, a fraction of its "
                                                                      "mean diagonal."),
    reparam: str | None = typer.Option(None, "--reparam", help="Reparameterization: none or repq (RepQ-ViT)."),
    w_granularity: str | None = typer.Option(None, "--w-granularity", help="per_channel or per_group."),
    group_size: int | None = typer.Option(None, "--group-size", help="Input channels per weight group."),
    a_granularity: str | None = typer.Option(None, "--a-granularity", help="per_tensor (static) or per_token."),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated names/aliases/globs/re:REGEX."),
    exclude: str | None = typer.Option(None, "--exclude", help="Comma-separated patterns to leave alone."),
    backend: str | None = typer.Option(None, "--backend", help="Deploy: auto, torch, triton (int8 GEMM) or bnb."),
    softmax: str | None = typer.Option(None, "--softmax", help="uniform, log2, logsqrt2, adalog or twin."),
    post_gelu: str | None = typer.Option(None, "--post-gelu", help="fc2 input: uniform, twin (PTQ4ViT) or adalog."),
    search_metric: str | None = typer.Option(
        None, "--search-metric", help="adalog / twin search objective: mse or hessian (PTQ4ViT)."),
    dtype: str | None = typer.Option(None, "--dtype", help="int, or fp8_e4m3 (W8A8 in float8)."),
    dense_fallback: str | None = typer.Option(
        None, "--dense-fallback", help="Deploy W8A8 for this GPU (e.g. sm90): layers its GEMM table measured "
                                       "faster in bf16 stay bf16."),
    dense_fallback_rows: int | None = typer.Option(
        None, "--dense-fallback-rows", help="Rows (batch x tokens) that --dense-fallback compares at."),
    mean_bits: float | None = typer.Option(
        None, "--mean-bits", help="Mixed precision: a width per layer at this parameter-weighted mean."),
    candidates: str | None = typer.Option(None, "--candidates", help="Mixed precision: the widths, e.g. 4,6,8."),
    keep: str | None = typer.Option(None, "--keep", help="Mixed precision: layers held at the widest candidate."),
    solver: str | None = typer.Option(None, "--solver", help="Mixed precision: exact (dynamic programming) or "
                                                             "greedy."),
    sensitivity: str | None = typer.Option(
        None, "--sensitivity", help="Mixed precision: kl (each layer alone) or hessian (HAWQ-v2 trace)."),
    calib_data: str | None = CalibDataOpt,
    calib_size: int | None = CalibSizeOpt,
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Post-training quantization: simulated W2-8/A2-8, or deployed (int8/fp8 W8A8, weight-only int8/int4, bnb);
    with --mean-bits, mixed precision (a simulated width per layer from calibration sensitivities)."""
    fields = _given(observer=observer, rounding=rounding, recon_iters=recon_iters, act_order=act_order,
                    gptq_sequential=gptq_sequential, gptq_damp=gptq_damp, reparam=reparam,
                    w_granularity=w_granularity, group_size=group_size, a_granularity=a_granularity,
                    layers=_split(layers), exclude=_split(exclude), backend=backend, softmax=softmax,
                    post_gelu=post_gelu, search_metric=search_metric, dtype=dtype, dense_fallback=dense_fallback,
                    dense_fallback_rows=dense_fallback_rows)
    mixed = _given(mean_bits=mean_bits, candidates=_ints(candidates, "--candidates"), keep=_split(keep),
                   solver=solver, sensitivity=sensitivity)
    if mixed and _given(w_bits=w_bits, a_bits=a_bits, mode=mode):
        raise ConfigError("--mean-bits chooses each layer's width (simulated): drop --w-bits / --a-bits / --mode")
    if mixed and "mean_bits" not in mixed:
        raise ConfigError("--candidates / --keep / --solver / --sensitivity are mixed-precision options: give "
                          "--mean-bits")
    cfg = MixedPrecisionConfig(**mixed, quant=fields, **_given(calib_size=calib_size)) if mixed else \
        QuantConfig(**_given(w_bits=w_bits, a_bits=a_bits, mode=mode, calib_size=calib_size), **fields)
    _needs_calibration([cfg], calib := _calibration(calib_data, calib_size))
    m = _model(model, **(model_opts or {}))
    print_records("quantize", out, compress_to(out, m, [cfg], calib=calib))


@app.command()
@model_options
def export(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="File to write: .onnx or .pt2 (an existing file is never replaced)."),
    format_: str | None = typer.Option(None, "--format", help="onnx (W8A8 as QDQ) or pt2 (torch.export)."),
    batch_size: str | None = typer.Option(None, "--batch-size", help="An integer (static batch) or dynamic."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (13..21)."),
    qdq_activations: str | None = typer.Option(
        None, "--qdq-activations", help="int8 (symmetric; TensorRT) or uint8 (zero point 128; ORT on x86)."),
    qdq_weight_bits: int | None = typer.Option(
        None, "--qdq-weight-bits", help="8, or 7 for runtimes on CPUs without VNNI (AVX2-only: exact there)."),
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Export MODEL (timm id, checkpoint or artifact, any stack) to ONNX or a torch.export program."""
    cfg = ExportConfig(**_given(format=format_, batch_size=batch_size, opset=opset, qdq_activations=qdq_activations,
                                qdq_weight_bits=qdq_weight_bits))
    m = _model(model, **(model_opts or {}))
    summary = export_model(m, out, cfg)
    print_table("export", {k: "; ".join(v) if isinstance(v, list) else v for k, v in summary.items()})


@app.command()
def sweep(
    recipe: str = typer.Argument(..., help="Sweep recipe YAML (a path, or a bundled name: demo, vit_b16_gpu)."),
    out: Path = typer.Option(..., "--out", help="Sweep directory (re-running resumes it)."),
    no_report: bool | None = typer.Option(None, "--no-report", help="Do not write the report at the end."),
    data: str | None = typer.Option(None, "--data", help="The recipe's ${data}: a data spec or path."),
    var: list[str] | None = typer.Option(None, "--var", help="NAME=VALUE for the recipe's ${NAME} (repeatable)."),
) -> None:
    """Measure compression stacks on one base model; resumable; writes the Pareto report."""
    variables = dict(_var(v) for v in var or [])
    if data is not None:
        variables["data"] = data
    with distributed.session():  # under torchrun the points are split across ranks
        rank, size = distributed.world()
        run_sweep(recipe, out, progress=sys.stderr.isatty() and rank == 0, log=lambda m: typer.echo(m, err=True),
                  report=not no_report, shard=(rank, size), variables=variables,
                  command=shlex.join(["vitcompress", "sweep", *sys.argv[sys.argv.index("sweep") + 1:]])
                  if "sweep" in sys.argv else None)
    if not no_report and rank == 0:
        print_fronts(out)


def _var(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.isidentifier():
        raise ConfigError(f"--var takes NAME=VALUE, got '{text}'")
    return name, value


@app.command()
def report(sweep_dir: Path = typer.Argument(..., help="A sweep directory.")) -> None:
    """Pareto fronts, report.md, pareto.png, points.csv and pareto.json from a sweep directory."""
    write_report(sweep_dir)
    print_fronts(sweep_dir)


@app.command()
def demo(
    out: Path | None = typer.Option(None, "--out", help="Where to write the report (default ./vitcompress-demo)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Sweep recipe (default: the bundled demo)."),
) -> None:
    """The main job: train (or reuse) the digits baseline, sweep every method alone and stacked, report."""
    path = run_demo(**_given(out=out, recipe=recipe), progress=sys.stderr.isatty(),
                    log=lambda m: typer.echo(m, err=True))
    print_fronts(path)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns the exit code (0 ok, 1 usage error, 2 user error, 130 interrupted)."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="vitcompress")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("error: interrupted", file=sys.stderr)
        return 130
    except _CliError as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {' '.join(message.split())} (see vitcompress --help)", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1) or 1)
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The ``vitcompress`` console script."""
    sys.exit(main())

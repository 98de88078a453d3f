"""The ``vitcompress`` command line: a thin layer over the library.

Options default to None and are passed on only when given, so every default lives in the library's
configs. User errors (:class:`~vitcompress.errors.UserError`, click usage errors) print one line on
stderr and exit non-zero, with no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .cli_output import print_eval, print_fronts, print_table
from .errors import ConfigError, UserError

try:  # typer >= 0.20 vendors click; its exceptions derive from TyperException
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover - older typer on real click
    from click import ClickException as _CliError

app = typer.Typer(
    name="vitcompress",
    help="Compress pretrained Vision Transformers and measure what each step costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got '{text}'") from None


def _load_model(model: str, pretrained: bool | None, checkpoint: Path | None, img_size: int | None,
                patch_size: int | None, num_classes: int | None):
    from .models import create_model

    return create_model(model, pretrained=bool(pretrained), checkpoint=checkpoint,
                        **_given(img_size=img_size, patch_size=patch_size, num_classes=num_classes))


ModelArg = typer.Argument(..., help="timm id (e.g. deit_small_patch16_224) or a vitcompress artifact directory.")
PretrainedOpt = typer.Option(None, "--pretrained", help="Load timm's pretrained weights (needs the hub).")
CheckpointOpt = typer.Option(None, "--checkpoint", help="A timm state dict (.pth/.bin/.safetensors).")
ImgSizeOpt = typer.Option(None, "--img-size", help="Input resolution override (position embeddings adapt).")
PatchSizeOpt = typer.Option(None, "--patch-size", help="Patch size override.")
NumClassesOpt = typer.Option(None, "--num-classes", help="Classifier size override.")


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML (a path, or a bundled name: digits_vit)."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
    seed: int | None = typer.Option(None, "--seed", help="Override the recipe's seed."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    limit: int | None = typer.Option(None, "--limit", help="Train on this many images."),
) -> None:
    """Train or fine-tune a classifier from a recipe and save it as an artifact."""
    from .recipes import recipe_path
    from .train import TrainConfig, load_recipe
    from .train import train as run_train

    data = load_recipe(recipe_path(recipe))
    section = data.get("train", data)
    cfg = TrainConfig.from_dict({**section, **_given(epochs=epochs, seed=seed, device=device, limit=limit)})
    _, metrics = run_train(cfg, out, progress=sys.stderr.isatty(), recipe=data)
    print_table("train", {"artifact": str(out), **metrics})


@app.command("eval")
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
    dtype: str | None = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (autocast)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    compile_: bool | None = typer.Option(None, "--compile", help="Time with torch.compile."),
    repeat: int | None = typer.Option(None, "--repeat", help="Timed repetitions per batch size."),
    no_speed: bool | None = typer.Option(None, "--no-speed", help="Skip latency and memory."),
    json_out: Path | None = typer.Option(None, "--json", help="Write all metrics to this JSON file."),
    workers: int | None = typer.Option(None, "--workers", help="Data-loading worker processes."),
    pretrained: bool | None = PretrainedOpt,
    checkpoint: Path | None = CheckpointOpt,
    img_size: int | None = ImgSizeOpt,
    patch_size: int | None = PatchSizeOpt,
    num_classes: int | None = NumClassesOpt,
) -> None:
    """Accuracy, agreement with a reference, latency, memory, size and GFLOPs of MODEL on --data."""
    from .bench import BenchConfig
    from .data import load_data
    from .errors import check_positive
    from .evaluate import evaluate
    from .io import atomic_write_json
    from .models import create_model, data_config

    check_positive("batch size", batch_size)
    check_positive("limit", limit)
    bench = BenchConfig(**_given(dtype=dtype, device=device, compile=compile_, repeat=repeat,
                                 batch_sizes=_ints(bench_batch_sizes, "--bench-batch-sizes")))
    from . import distributed

    m = _load_model(model, pretrained, checkpoint, img_size, patch_size, num_classes)
    dataset = load_data(data, data_config(m), split=split, limit=limit)
    ref: Any = "auto"
    if reference is not None:
        ref = None if reference.lower() == "none" else create_model(reference)
    with distributed.session(bench.resolve_device()):  # data-parallel under torchrun; a no-op otherwise
        result = evaluate(m, dataset, reference=ref, bench=bench, speed=not no_speed,
                          progress=sys.stderr.isatty() and distributed.is_main(),
                          **_given(batch_size=batch_size, workers=workers))
        result["world_size"] = distributed.shard()[1]
        if not distributed.is_main():
            return
    if json_out is not None:
        atomic_write_json(json_out, result)
    print_eval(result)


@app.command()
def merge(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    r: float | None = typer.Option(None, "--r", help="ToMe: tokens merged per layer (fractional r is spread)."),
    keep_rate: float | None = typer.Option(None, "--keep-rate", help="EViT: fraction of patch tokens kept."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="Fraction of the base GFLOPs."),
    target_speedup: float | None = typer.Option(None, "--target-speedup", help="Measured bf16 speedup to reach."),
    schedule: str | None = typer.Option(None, "--schedule", help="Tokens removed per layer, e.g. 8,8,4,0."),
    method: str | None = typer.Option(None, "--method", help="tome or evit."),
    prop_attn: str | None = typer.Option(None, "--prop-attn", help="Proportional attention: auto, on or off."),
    attention: str | None = typer.Option(None, "--attention",
                                         help="Merged layers' attention kernel: auto, torch or triton."),
    inflection: float | None = typer.Option(None, "--inflection", help="ToMe schedule tilt: -1 decreasing."),
    layers: str | None = typer.Option(None, "--layers", help="EViT reduction layers, e.g. 3,6,9."),
    img_size: int | None = typer.Option(None, "--img-size", help="Also run at this resolution (baseline knob)."),
    pretrained: bool | None = PretrainedOpt,
    checkpoint: Path | None = CheckpointOpt,
) -> None:
    """Token merging (ToMe) or pruning (EViT), training-free; writes an artifact."""
    from .artifact import save_artifact
    from .methods import ResolutionConfig, TokenMergeConfig
    from .methods.token_merge import tokens_per_layer
    from .transforms import compress_

    strengths = _given(r=r, keep_rate=keep_rate, target_flops=target_flops, target_speedup=target_speedup,
                       schedule=_ints(schedule, "--schedule"))
    if not strengths and img_size is None:
        raise ConfigError("give one of --r, --keep-rate, --target-flops, --target-speedup, --schedule or --img-size")
    cfg = TokenMergeConfig(**strengths, **_given(method=method, prop_attn=prop_attn, attention=attention,
                                                 inflection=inflection, layers=_ints(layers, "--layers"))) \
        if strengths else None
    m = _load_model(model, pretrained, checkpoint, None, None, None)
    if img_size is not None:
        compress_(m, ResolutionConfig(img_size=img_size))
    if cfg is not None:
        compress_(m, cfg)
    save_artifact(m, out)
    from .models import model_info

    state = model_info(m).transforms[-1]["state"]
    print_table("merge", {"artifact": str(out), "tokens per layer": tokens_per_layer(m) or state.get("tokens"),
                           "GFLOPs fraction": state.get("flops_fraction"),
                           "measured speedup": state.get("measured_speedup")})


@app.command()
def prune(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    heads: float | None = typer.Option(None, "--heads", help="Fraction of attention heads removed."),
    mlp: float | None = typer.Option(None, "--mlp", help="Fraction of MLP hidden channels removed."),
    block_sparsity: float | None = typer.Option(None, "--block-sparsity", help="Fraction of weight blocks removed."),
    block_size: int | None = typer.Option(None, "--block-size", help="Block edge B (BxB tiles)."),
    criterion: str | None = typer.Option(None, "--criterion", help="magnitude, taylor or hessian."),
    scope: str | None = typer.Option(None, "--scope", help="Heads/MLP ranking: global or per_layer."),
    calib_data: str | None = typer.Option(None, "--calib-data", help="Images for taylor/hessian (train split)."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="Calibration images."),
    finetune_epochs: int | None = typer.Option(None, "--finetune-epochs", help="Recovery fine-tuning epochs."),
    data: str | None = typer.Option(None, "--data", help="Fine-tuning data (its train split)."),
    distill: bool | None = typer.Option(None, "--distill", help="Distil from the unpruned model while fine-tuning."),
    distill_type: str | None = typer.Option(None, "--distill-type", help="soft (KL) or hard (DeiT)."),
    attn_only: bool | None = typer.Option(None, "--attn-only", help="Fine-tune only the attention weights."),
    lr: float | None = typer.Option(None, "--lr", help="Fine-tuning learning rate."),
    device: str | None = typer.Option(None, "--device", help="Fine-tuning device: auto, cpu or cuda[:N]."),
    pretrained: bool | None = PretrainedOpt,
    checkpoint: Path | None = CheckpointOpt,
) -> None:
    """Structured (heads, MLP width) and block-structured pruning, with optional distillation recovery."""
    from .artifact import save_artifact
    from .data import load_data
    from .methods import BlockSparseConfig, PruneConfig
    from .models import data_config, model_info
    from .recover import RecoveryConfig, finetune_, unpruned_teacher
    from .transforms import compress_

    configs: list[Any] = []
    if heads is not None or mlp is not None:
        configs.append(PruneConfig(**_given(heads=heads, mlp=mlp, criterion=criterion, scope=scope,
                                            calib_size=calib_size)))
    if block_sparsity is not None:
        configs.append(BlockSparseConfig(**_given(sparsity=block_sparsity, block_size=block_size,
                                                  criterion=criterion, calib_size=calib_size)))
    elif block_size is not None:
        raise ConfigError("--block-size needs --block-sparsity")
    if not configs:
        raise ConfigError("give --heads, --mlp and/or --block-sparsity")
    recovery = None
    if finetune_epochs is not None:
        if data is None:
            raise ConfigError("--finetune-epochs needs --data (its train split is used)")
        recovery = RecoveryConfig(data=data, epochs=finetune_epochs,
                                  distill=(distill_type or "soft") if distill else "none",
                                  **_given(attn_only=attn_only, lr=lr, device=device))
    elif distill or attn_only or data is not None:
        raise ConfigError("--distill, --attn-only and --data apply to recovery: add --finetune-epochs N")
    m = _load_model(model, pretrained, checkpoint, None, None, None)
    teacher = unpruned_teacher(m) if recovery is not None and recovery.distill != "none" else None
    for cfg in configs:
        calib = None
        if cfg.needs_calibration:
            if calib_data is None:
                raise ConfigError(f"--criterion {cfg.criterion} needs --calib-data (e.g. digits)")
            ds = load_data(calib_data, data_config(m), limit=cfg.calib_size, purpose="calib")
            calib = ds.loader(min(cfg.calib_size, 32))
            model_info(m).provenance["calibration"] = ds.describe()
        compress_(m, cfg, calib=calib)
    rec = finetune_(m, recovery, teacher=teacher, progress=sys.stderr.isatty()) if recovery is not None else None
    save_artifact(m, out)
    rows: dict[str, Any] = {"artifact": str(out)}
    for t in model_info(m).transforms[-len(configs):]:
        rows.update({f"{t['name']} {k}": v for k, v in t["state"].items() if k != "layers"})
    rows["recovery"] = "none" if rec is None else f"{rec['level']} ({recovery.epochs} epochs, {recovery.distill})"
    print_table("prune", rows)


def _bits(text: str | None, name: str) -> int | None | str:
    if text is None:
        return "unset"
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer from 2 to 8 or 'none', got '{text}'") from None


@app.command()
def quantize(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    calib_data: str | None = typer.Option(None, "--calib-data", help="Calibration images (train split is used)."),
    w_bits: str | None = typer.Option(None, "--w-bits", help="Weight bits 2..8, or none."),
    a_bits: str | None = typer.Option(None, "--a-bits", help="Activation bits 2..8, or none."),
    mode: str | None = typer.Option(None, "--mode", help="simulate (any width) or deploy (runs low precision)."),
    method: str | None = typer.Option(None, "--method", help="minmax, percentile, mse (observers), repq or gptq."),
    w_granularity: str | None = typer.Option(None, "--w-granularity", help="per_channel or per_group."),
    group_size: int | None = typer.Option(None, "--group-size", help="Input channels per weight group."),
    a_granularity: str | None = typer.Option(None, "--a-granularity", help="per_tensor (static) or per_token."),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated names/aliases/globs/re:REGEX."),
    exclude: str | None = typer.Option(None, "--exclude", help="Comma-separated patterns to leave alone."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="Calibration images."),
    backend: str | None = typer.Option(None, "--backend", help="Deploy: auto, torch, triton (int8 GEMM) or bnb."),
    softmax: str | None = typer.Option(None, "--softmax", help="Softmax quantizer: uniform, log2, logsqrt2."),
    dtype: str | None = typer.Option(None, "--dtype", help="int, or fp8_e4m3 (W8A8 in float8)."),
    pretrained: bool | None = PretrainedOpt,
    checkpoint: Path | None = CheckpointOpt,
) -> None:
    """Post-training quantization: simulated W2-8/A2-8, or deployed (int8/fp8 W8A8, weight-only int8/int4, bnb)."""
    from .artifact import save_artifact
    from .data import load_data
    from .methods import QuantConfig
    from .models import data_config, model_info
    from .transforms import compress_

    rounding = reparam = None
    if method == "gptq":  # GPTQ weight rounding; activation ranges stay minmax
        method, rounding = None, "gptq"
    elif method == "repq":  # RepQ-ViT reparameterization before minmax calibration
        method, reparam = None, "repq"
    bits = {k: v for k, v in (("w_bits", _bits(w_bits, "--w-bits")), ("a_bits", _bits(a_bits, "--a-bits")))
            if v != "unset"}
    cfg = QuantConfig(**bits, **_given(mode=mode, observer=method, rounding=rounding, reparam=reparam, backend=backend,
                                       w_granularity=w_granularity, softmax=softmax, dtype=dtype,
                                       group_size=group_size, a_granularity=a_granularity, calib_size=calib_size,
                                       layers=None if layers is None else layers.split(","),
                                       exclude=None if exclude is None else exclude.split(",")))
    m = _load_model(model, pretrained, checkpoint, None, None, None)
    calib = None
    if cfg.needs_calibration:
        if calib_data is None:
            raise ConfigError("static activation quantization and gptq need --calib-data (e.g. digits)")
        data = load_data(calib_data, data_config(m), limit=cfg.calib_size, purpose="calib")
        calib = data.loader(cfg.calib_size)
        model_info(m).provenance["calibration"] = data.describe()
    compress_(m, cfg, calib=calib)
    save_artifact(m, out)
    state = model_info(m).transforms[-1]["state"]
    print_table("quantize", {"artifact": str(out), "layers": len(state["layers"]),
                              "calibrated": state["calibrated"],
                              "mode": f"{cfg.mode} ({'deployable' if state.get('deployable') else 'accuracy-only'})"})


@app.command()
def sweep(
    recipe: str = typer.Argument(..., help="Sweep recipe YAML (a path, or a bundled name: demo, vit_b16_gpu)."),
    out: Path = typer.Option(..., "--out", help="Sweep directory (re-running resumes it)."),
    no_report: bool | None = typer.Option(None, "--no-report", help="Do not write the report at the end."),
) -> None:
    """Measure compression stacks on one base model; resumable; writes the Pareto report."""
    from . import distributed
    from .sweep import run_sweep

    with distributed.session():  # under torchrun the points are split across ranks
        rank, size = distributed.world()
        run_sweep(recipe, out, progress=sys.stderr.isatty() and rank == 0, log=lambda m: typer.echo(m, err=True),
                  report=not no_report, shard=(rank, size))
    if not no_report and rank == 0:
        print_fronts(out)


@app.command()
def report(sweep_dir: Path = typer.Argument(..., help="A sweep directory.")) -> None:
    """Pareto fronts, report.md, pareto.png, points.csv and pareto.json from a sweep directory."""
    from .report import write_report

    write_report(sweep_dir)
    print_fronts(sweep_dir)


@app.command()
def demo(
    out: Path | None = typer.Option(None, "--out", help="Where to write the report (default ./vitcompress-demo)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Sweep recipe (default: the bundled demo)."),
) -> None:
    """The main job: train (or reuse) the digits baseline, sweep every method alone and stacked, report."""
    from .demo import run_demo

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

"""The ``vitcompress`` command line: a thin layer over the library.

Options default to None and are passed on only when given, so every default lives in the library's
configs. User errors (:class:`~vitcompress.errors.UserError`, click usage errors) print one line on
stderr and exit non-zero, with no traceback.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import typer
import yaml

from . import (
    cli_info,  # noqa: F401  (registers info and list)
    cli_tokens,  # noqa: F401  (registers merge, adapt, learn-merge, sparse-attn, eventful)
    distributed,
)
from .artifact import check_writable
from .bench import BenchConfig
from .cli_common import (
    ModelArg,
    OutOpt,
    _CliError,
    _given,
    _model,
    _needs_calibration,
    _runtime_model,
    app,
    compress_command,
    config_options,
    model_options,
)
from .cli_output import print_eval, print_fronts, print_records, print_table
from .data.registry import SPECS
from .demo import run_demo
from .errors import ConfigError, Note, UserError
from .evaluate import evaluate_spec
from .export import ExportConfig, export_model
from .io import atomic_write_json
from .pipeline import Calibration, compress_to, create_model
from .recipes import recipe_path
from .report import write_report
from .robustness import AttackConfig
from .search import SearchConfig, run_search
from .sweep import run_sweep
from .train import load_recipe, recipe_config
from .train import train as run_train
from .transforms import (
    BlockSparseConfig,
    MiniVitConfig,
    MixedPrecisionConfig,
    PruneConfig,
    QuantConfig,
    RecoveryConfig,
)
from .ui import interrupted_line, show_progress


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML (a path, or a bundled name: digits_vit)."),
    out: Path = OutOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
    seed: int | None = typer.Option(None, "--seed", help="Override the recipe's seed."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    limit: int | None = typer.Option(None, "--limit", help="Train on this many images."),
    data: str | None = typer.Option(None, "--data", help=f"Override the recipe's training data: {SPECS}."),
    eval_data: str | None = typer.Option(None, "--eval-data", help="Override the recipe's eval data; none to skip."),
    dtype: str | None = typer.Option(None, "--dtype", help="Override the recipe's dtype: auto, bf16, fp16 or fp32."),
    checkpoint: str | None = typer.Option(None, "--checkpoint",
                                          help="A local state dict for the recipe's model (e.g. a backbone)."),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help="Evaluate on this many evenly spaced images."),
) -> None:
    """Train or fine-tune a classifier from a recipe and save it as an artifact."""
    doc = load_recipe(recipe_path(recipe))
    cfg = recipe_config(doc, **_given(epochs=epochs, seed=seed, device=device, limit=limit, data=data, dtype=dtype,
                                      eval_data=eval_data, checkpoint=checkpoint, eval_limit=eval_limit))
    check_writable(out)
    _, metrics = run_train(cfg, out, progress=True, recipe=doc, log=lambda m: typer.echo(m, err=True))
    print_table("train", {"artifact": str(out), **metrics})


@app.command("eval")
@model_options
@config_options("eval", BenchConfig, AttackConfig)
def eval_(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", help=f"The evaluation images: {SPECS}."),
    opts: dict[str, Any] | None = None,
    model_opts: dict[str, Any] | None = None,
) -> None:
    """Accuracy, agreement with a reference, latency, memory, size and GFLOPs of MODEL on --data.

    MODEL may be an exported .onnx/.pt2 file: its agreement is then measured against the artifact it came from."""
    o = opts or {}
    bench = BenchConfig(**{k: o[k] for k in ("dtype", "device", "compile", "compile_mode", "repeat", "batch_sizes")
                           if k in o})
    verify = not o.get("no_verify")
    m = _runtime_model(model, o.get("runtime"), o.get("runtime_opts"), verify=verify) or \
        _model(model, **(model_opts or {}), verify=verify)
    reference = o.get("reference")
    ref: Any = "auto" if reference is None else None if reference.lower() == "none" else create_model(reference)
    attack_fields = {k: o[k] for k in ("eps", "steps", "source") if k in o}
    if attack_fields and "method" not in o:
        raise ConfigError("--eps / --steps / --attack-source need --attack fgsm|pgd")
    atk = AttackConfig(method=o["method"], **attack_fields) if "method" in o else None
    split, limit, json_out = o.get("split"), o.get("limit"), o.get("json")
    with distributed.session(bench.resolve_device()):  # data-parallel under torchrun; a no-op otherwise
        result = evaluate_spec(m, data, split=split, limit=limit, reference=ref, bench=bench,
                               speed=not o.get("no_speed"), progress=distributed.is_main(),
                               attack=atk, **{k: o[k] for k in ("batch_size", "workers") if k in o})
        if not distributed.is_main():
            return
    if json_out is not None:
        atomic_write_json(json_out, result)
    print_eval(result)


@compress_command("prune", PruneConfig, BlockSparseConfig, MiniVitConfig, RecoveryConfig, calibrated=True)
def prune(model: str, out: Path, opts: dict[str, Any], calib: Calibration | None, model_opts: dict[str, Any]) -> None:
    """Structured (heads, MLP width), block-structured pruning and MiniViT weight sharing, with optional
    distillation recovery."""

    def pick(*names: str) -> dict[str, Any]:
        return {k: opts[k] for k in names if k in opts}

    common = pick("criterion", "calib_size")
    structured = pick("heads", "mlp", "scope", "refit", "refit_size", "refit_head")
    stack: list[Any] = [PruneConfig(**structured, **common)] if pick("heads", "mlp") else []
    if "block_size" in opts and "sparsity" not in opts:
        raise ConfigError("--block-size needs --sparsity (the fraction of blocks removed)")
    stack += [BlockSparseConfig(**pick("sparsity", "block_size"), **common)] if "sparsity" in opts else []
    stack = [MiniVitConfig(share=opts["share"])] + stack if "share" in opts else stack
    if not stack:
        raise ConfigError("give --heads, --mlp, --sparsity and/or --share")
    recovery = pick("epochs", "data", "distill", "attn_only", "lr", "device")
    stack += [RecoveryConfig(**recovery)] if recovery else []
    _needs_calibration(stack, calib)
    print_records("prune", out, compress_to(out, _model(model, **model_opts), stack, calib=calib))


MIXED_FIELDS = ("mean_bits", "candidates", "keep", "solver", "sensitivity")


@compress_command("quantize", QuantConfig, MixedPrecisionConfig, calibrated=True)
def quantize(model: str, out: Path, opts: dict[str, Any], calib: Calibration | None,
             model_opts: dict[str, Any]) -> None:
    """Post-training quantization: simulated W2-8/A2-8, or deployed (int8/fp8 W8A8, weight-only int8/int4, bnb);
    with --mean-bits, mixed precision (a simulated width per layer from calibration sensitivities)."""
    mixed = {k: v for k, v in opts.items() if k in MIXED_FIELDS}
    widths = {k: v for k, v in opts.items() if k in ("w_bits", "a_bits", "mode")}
    own = {k: v for k, v in opts.items() if k == "calib_size"}  # the mixed step's own, or the quantize step's
    fields = {k: v for k, v in opts.items() if k not in {*MIXED_FIELDS, *widths, *own}}
    if mixed and widths:
        raise ConfigError("--mean-bits chooses each layer's width (simulated): drop --w-bits / --a-bits / --mode")
    if mixed and "mean_bits" not in mixed:
        raise ConfigError("--candidates / --keep / --solver / --sensitivity are mixed-precision options: give "
                          "--mean-bits")
    cfg = MixedPrecisionConfig(**mixed, quant=fields, **own) if mixed else QuantConfig(**widths, **own, **fields)
    _needs_calibration([cfg], calib)
    print_records("quantize", out, compress_to(out, _model(model, **model_opts), [cfg], calib=calib))


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
    data: str | None = typer.Option(None, "--data", help=f"The recipe's ${{data}}: {SPECS}."),
    var: list[str] | None = typer.Option(None, "--var", help="NAME=VALUE for the recipe's ${NAME} (repeatable)."),
    set_: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE: replace a recipe field, KEY dotted "
                                          "(bench.batch_sizes=[1,16]), VALUE in YAML (repeatable)."),
    only: list[str] | None = typer.Option(None, "--only", help="Run only the points whose names start with this "
                                          "(repeatable; the base and dense baselines always run)."),
) -> None:
    """Measure compression stacks on one base model; resumable; writes the Pareto report."""
    variables = dict(_var(v) for v in var or [])
    overrides = dict(_setting(s) for s in set_ or [])
    if data is not None:
        variables["data"] = data
    with distributed.session():  # under torchrun the points are split across ranks
        rank, size = distributed.world()
        run_sweep(recipe, out, progress=rank == 0, log=lambda m: typer.echo(m, err=True),
                  report=not no_report, shard=(rank, size), variables=variables, overrides=overrides, only=only,
                  command=_sweep_command(sys.argv))
    if not no_report and rank == 0:
        print_fronts(out)


SearchOutOpt = typer.Option(..., "--out", help="Search folder (re-running resumes it); writes best/ and best.onnx.")


@app.command()
@config_options("search", SearchConfig)
def search(model: str = ModelArg, out: Path = SearchOutOpt, opts: dict[str, Any] | None = None) -> None:
    """The fastest stack deployable on --target whose held-out drop stays within --max-drop (needs Optuna)."""
    cfg = SearchConfig(model=model, **(opts or {}))
    with distributed.session():  # under torchrun the ranks evaluate trials of the one study in parallel
        run_search(cfg, out, log=lambda m: typer.echo(m, err=True))


def _sweep_command(argv: list[str]) -> str | None:
    """The command that regenerates the sweep's table: the command line without ``--only`` (which chose what ran
    now; the table holds every finished point, and the same command fills in the rest)."""
    if "sweep" not in argv:
        return None
    args, rest = [], iter(argv[argv.index("sweep") + 1:])
    for a in rest:
        if a == "--only":
            next(rest, None)
        elif not a.startswith("--only="):
            args.append(a)
    return shlex.join(["vitcompress", "sweep", *args])


def _setting(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: VALUE parsed as YAML (``[1, 16]``, ``{model: vit_tiny_patch16_224}``, ``cpu``)."""
    key, eq, value = text.partition("=")
    if not eq or not all(part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"--set takes KEY=VALUE with a dotted KEY, got '{text}'")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: the value is not YAML ({str(e).splitlines()[0]})") from None


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
    path = run_demo(**_given(out=out, recipe=recipe), progress=True,
                    log=lambda m: typer.echo(m, err=True))
    print_fronts(path)


def _show_note(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
               line: str | None = None) -> None:
    """Notes print as one ``note:`` line; other warnings as Python prints them."""
    if issubclass(category, Note):
        print(f"note: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns the exit code (0 ok, 1 usage error, 2 user error, 130 interrupted)."""
    with warnings.catch_warnings():  # notes print as one line while a command runs; restored afterwards
        warnings.simplefilter("always", Note)
        warnings.showwarning = _show_note
        show_progress(True)  # every long step says how far it is (a bar on a terminal, plain lines in a log)
        try:
            return _main(argv)
        finally:
            show_progress(False)


def _main(argv: list[str] | None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="vitcompress")
        if rv == 130:  # Typer's answer to a Ctrl-C inside a command
            print(interrupted_line(), file=sys.stderr)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print(interrupted_line(), file=sys.stderr)
        return 130
    except _CliError as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {' '.join(message.split())} (see vitcompress --help)", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1) or 1)
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The ``vitcompress`` console script."""
    sys.exit(main())

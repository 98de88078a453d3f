"""What the ``vitcompress`` commands share: the Typer app, the common options and the flag parsers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml
from torch import nn

from ._version import __version__
from .artifact import is_artifact
from .data.registry import SPECS
from .errors import ConfigError
from .export import is_exported, load_runtime_model
from .models import model_info
from .pipeline import Calibration, create_model

try:  # typer >= 0.20 vendors click; its exceptions derive from TyperException
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover - older typer on real click
    from click import ClickException as _CliError

app = typer.Typer(
    name="vitcompress",
    help="Compress pretrained Vision Transformers and measure what each step costs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vitcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _top(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Compress pretrained Vision Transformers and measure what each step costs."""


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got '{text}'") from None


def _model(model: str, pretrained: bool | None = None, checkpoint: Path | None = None,
           random_weights: bool | None = None, img_size: int | None = None, patch_size: int | None = None,
           num_classes: int | None = None, model_arg: list[str] | None = None, *, verify: bool = True) -> nn.Module:
    """MODEL plus the model options every command takes (timm ids only; an artifact takes none). A timm id needs
    weights (``--pretrained`` / ``--checkpoint``) or an explicit ``--random-weights``: a forgotten flag must not
    give a "compressed" model of random weights."""
    kwargs = {**_given(img_size=img_size, patch_size=patch_size, num_classes=num_classes),
              **_key_values(model_arg, "--model-arg", " (a timm.create_model argument)")}
    built = create_model(model, pretrained=bool(pretrained), checkpoint=checkpoint, verify=verify, **kwargs)
    if not (is_exported(model) or is_artifact(model) or pretrained or checkpoint):  # built (so checked) first
        if not random_weights:
            raise ConfigError(f"{model} would have random weights: pass --pretrained (timm's hub weights), "
                              "--checkpoint FILE, or --random-weights (for speed studies)")
        model_info(built).provenance["random_weights"] = True
    return built


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


ModelArg = typer.Argument(..., help="timm id (e.g. deit_small_patch16_224) or a vitcompress artifact directory.")
OutOpt = typer.Option(..., "--out", help="Artifact directory to write (new, empty, or an artifact).")
PretrainedOpt = typer.Option(None, "--pretrained", help="Load timm's pretrained weights (needs the hub).")
CheckpointOpt = typer.Option(None, "--checkpoint", help="A timm state dict (.pth/.bin/.safetensors).")
RandomWeightsOpt = typer.Option(None, "--random-weights",
                                help="Build a timm id with random weights on purpose (speed studies only).")
ImgSizeOpt = typer.Option(None, "--img-size", help="Input resolution override (position embeddings adapt).")
PatchSizeOpt = typer.Option(None, "--patch-size", help="Patch size override.")
NumClassesOpt = typer.Option(None, "--num-classes", help="Classifier size override (a fine-tuned N-class model).")
ModelArgOpt = typer.Option(None, "--model-arg", help="KEY=VALUE for timm.create_model (repeatable): embed_dim=128.")
# The model options, declared once: @model_options adds them to a command, which receives them as one dict
MODEL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "pretrained": (bool | None, PretrainedOpt), "checkpoint": (Path | None, CheckpointOpt),
    "random_weights": (bool | None, RandomWeightsOpt),
    "img_size": (int | None, ImgSizeOpt), "patch_size": (int | None, PatchSizeOpt),
    "num_classes": (int | None, NumClassesOpt), "model_arg": (list[str] | None, ModelArgOpt),
}


def _with_options(fn: Callable[..., Any], takes: str, extra: list[inspect.Parameter],
                  pack: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[..., Any]:
    """``fn`` as a Typer command with the keyword options ``extra`` after its own parameters, in place of its
    parameter ``takes``: at call time ``pack(given, kwargs)`` turns the options' values into what ``fn`` takes."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        pack({p.name: kwargs.pop(p.name, None) for p in extra}, kwargs)
        return fn(*args, **kwargs)

    command.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != takes] + extra)
    command.__annotations__ = {**{k: v for k, v in typing.get_type_hints(fn).items() if k != takes},
                               **{p.name: p.annotation for p in extra}}
    return command


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command the model options (:data:`MODEL_OPTIONS`, after its own parameters); the command
    takes them as ``model_opts: dict`` (pass it on: ``_model(model, **model_opts)``)."""
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, (ann, opt) in MODEL_OPTIONS.items()]
    return _with_options(fn, "model_opts", extra, lambda given, kwargs: kwargs.update(model_opts=given))


# The commands that map flags onto config fields declare them as data: cli_options.yaml (COMMAND -> FIELD -> help)
OPTION_HELP: dict[str, dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "cli_options.yaml").read_text())


def _cli_type(hint: Any) -> tuple[type, Callable[[str, str], Any] | None]:
    """The Typer type of a config field's annotation, and how its text becomes the field's value (lists: commas)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint, args = args[0], list(typing.get_args(args[0]))
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return str, (lambda text, flag: _ints(text, flag)) if args and args[0] is int else \
            (lambda text, flag: _split(text))
    if hint in (bool, int, float):
        return hint, None
    return str, None  # str and the str-Enums: the config parses them


DECLARED: dict[str, tuple[Any, Any]] = {"str": (str, None), "int": (int, None), "bool": (bool, None),
                                        "path": (Path, None), "strs": (list[str], None)}


def config_options(command: str, *configs: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a Typer command one option per field that cli_options.yaml lists for ``command``: the flag is the
    field's name, the help the file's, the type the field's (from the first of ``configs`` that has it). The
    command takes the given ones as ``opts: dict`` (field -> value, comma lists parsed)."""
    hints: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for cls in reversed(configs):
        hints.update(typing.get_type_hints(cls))
        defaults.update(_field_defaults(cls))
    params, parsers = [], {}
    for field, entry in OPTION_HELP[command].items():
        entry = entry if isinstance(entry, dict) else {"help": entry}
        typ, parse = DECLARED[entry["type"]] if "type" in entry else _cli_type(hints[field])
        dash = field.replace("_", "-")
        flag = entry.get("flags") or (f"--{dash}/--no-{dash}" if typ is bool else f"--{dash}")
        text = entry["help"] + (f" Specs: {SPECS}." if field in ("data", "calib_data") else "")
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, annotation=typ | None,
                                        default=typer.Option(None, flag, help=_with_default(text,
                                                                                            defaults.get(field)))))
        if parse is not None:
            parsers[field] = (parse, flag.split("/")[0])

    def pack(given: dict[str, Any], kwargs: dict[str, Any]) -> None:
        kwargs["opts"] = {k: (parsers[k][0](v, parsers[k][1]) if k in parsers else v) for k, v in given.items()
                          if v is not None}

    return lambda fn: _with_options(fn, "opts", params, pack)


def _field_defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's default per field (factories called), for the help text."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _with_default(text: str, default: Any) -> str:
    """The help text with the config's default (the CLI has none of its own: the flag's value is None until given,
    so Typer would show no default)."""
    if default is None or default == "" or default == [] or default == {}:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else \
        str(default).lower() if isinstance(default, bool) else str(default)
    return f"{text} (default: {shown})"  # not [default: ...]: rich would read it as markup


CalibDataOpt = typer.Option(None, "--calib-data", help=f"Calibration images (their train split): {SPECS}.")
CalibSizeOpt = typer.Option(None, "--calib-size", help="Calibration images used.")


def calib_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command --calib-data and --calib-size; it takes ``calib`` (a :class:`Calibration` or None), and a given
    --calib-size joins ``opts`` (the configs' own ``calib_size`` field)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter("calib_data", kw, default=CalibDataOpt, annotation=str | None),
             inspect.Parameter("calib_size", kw, default=CalibSizeOpt, annotation=int | None)]

    def pack(given: dict[str, Any], kwargs: dict[str, Any]) -> None:
        kwargs["opts"] = {**(kwargs.get("opts") or {}), **_given(calib_size=given["calib_size"])}
        kwargs["calib"] = _calibration(given["calib_data"], given["calib_size"])

    return _with_options(fn, "calib", extra, pack)


def compress_command(name: str, *configs: type, calibrated: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """Register a compression command ``fn(model, out, opts, [calib,] model_opts)``: MODEL, --out, one option per
    config field that cli_options.yaml lists for ``name``, the calibration options when ``calibrated``, and the
    model options, each declared once."""
    def deco(fn: Callable[..., Any]) -> Any:
        sig = inspect.signature(fn)
        defaults = {"model": ModelArg, "out": OutOpt}
        fn.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
            p.replace(default=defaults[p.name]) if p.name in defaults else
            p.replace(default=None) if p.name in ("opts", "calib", "model_opts") else p
            for p in sig.parameters.values()])
        wrapped = config_options(name, *configs)(calib_options(fn) if calibrated else fn)
        return app.command(name)(model_options(wrapped))

    return deco


def _calibration(calib_data: str | None, calib_size: int | None) -> Calibration | None:
    return None if calib_data is None else Calibration(data=calib_data, **_given(size=calib_size))


def _needs_calibration(stack: list[Any], calib: Calibration | None) -> None:
    for c in stack:
        if getattr(c, "needs_calibration", False) and calib is None:
            raise ConfigError(f"{c.NAME} with these settings needs --calib-data (e.g. digits)")


def _runtime_model(model: str, runtime: str | None, runtime_opts: list[str] | None, *, verify: bool = True,
                   ) -> nn.Module | None:
    """An exported file under an explicit --runtime / --runtime-opts, or None to take the usual path."""
    if runtime is None and not runtime_opts:
        return None
    if not is_exported(model):
        raise ConfigError(f"--runtime and --runtime-opts apply to exported .onnx/.pt2 files, not '{model}'")
    return load_runtime_model(model, runtime, _key_values(runtime_opts, "--runtime-opts"), verify=verify)


def _key_values(items: list[str] | None, flag: str, what: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} takes KEY=VALUE{what}, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out




__all__ = ["CalibDataOpt", "CalibSizeOpt", "CheckpointOpt", "ImgSizeOpt", "ModelArg", "ModelArgOpt", "NumClassesOpt",
           "OutOpt", "PatchSizeOpt", "PretrainedOpt", "_CliError", "_calibration", "_given", "_ints", "_key_values",
           "_model", "_needs_calibration", "_runtime_model", "_split", "app", "calib_options", "compress_command",
           "config_options", "model_options"]

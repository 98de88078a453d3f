"""What the ``vitcompress`` commands share: the Typer app, the common options and the flag parsers."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml
from torch import nn

from .errors import ConfigError
from .export import is_exported, load_runtime_model
from .pipeline import Calibration, create_model

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


def _model(model: str, pretrained: bool | None = None, checkpoint: Path | None = None, img_size: int | None = None,
           patch_size: int | None = None, num_classes: int | None = None, model_arg: list[str] | None = None, *,
           verify: bool = True) -> nn.Module:
    """MODEL plus the model options every command takes (timm ids only; an artifact takes none)."""
    kwargs = {**_given(img_size=img_size, patch_size=patch_size, num_classes=num_classes),
              **_key_values(model_arg, "--model-arg", " (a timm.create_model argument)")}
    return create_model(model, pretrained=bool(pretrained), checkpoint=checkpoint, verify=verify, **kwargs)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


ModelArg = typer.Argument(..., help="timm id (e.g. deit_small_patch16_224) or a vitcompress artifact directory.")
OutOpt = typer.Option(..., "--out", help="Artifact directory to write (new, empty, or an artifact).")
PretrainedOpt = typer.Option(None, "--pretrained", help="Load timm's pretrained weights (needs the hub).")
CheckpointOpt = typer.Option(None, "--checkpoint", help="A timm state dict (.pth/.bin/.safetensors).")
ImgSizeOpt = typer.Option(None, "--img-size", help="Input resolution override (position embeddings adapt).")
PatchSizeOpt = typer.Option(None, "--patch-size", help="Patch size override.")
NumClassesOpt = typer.Option(None, "--num-classes", help="Classifier size override (a fine-tuned N-class model).")
ModelArgOpt = typer.Option(None, "--model-arg", help="KEY=VALUE for timm.create_model (repeatable): embed_dim=128.")
# The model options, declared once: @model_options adds them to a command, which receives them as one dict
MODEL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "pretrained": (bool | None, PretrainedOpt), "checkpoint": (Path | None, CheckpointOpt),
    "img_size": (int | None, ImgSizeOpt), "patch_size": (int | None, PatchSizeOpt),
    "num_classes": (int | None, NumClassesOpt), "model_arg": (list[str] | None, ModelArgOpt),
}


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command the model options (:data:`MODEL_OPTIONS`, after its own parameters); the command
    takes them as ``model_opts: dict`` (pass it on: ``_model(model, **model_opts)``)."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "model_opts"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, (ann, opt) in MODEL_OPTIONS.items()]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, model_opts={k: kwargs.pop(k, None) for k in MODEL_OPTIONS}, **kwargs)

    command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    hints = {k: v for k, v in typing.get_type_hints(fn).items() if k != "model_opts"}
    command.__annotations__ = {**hints, **{name: ann for name, (ann, _) in MODEL_OPTIONS.items()}}
    return command


CalibDataOpt = typer.Option(None, "--calib-data", help="Calibration images (their train split).")
CalibSizeOpt = typer.Option(None, "--calib-size", help="Calibration images used.")


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
           "_model", "_needs_calibration", "_runtime_model", "_split", "app", "model_options"]

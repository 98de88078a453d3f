"""Config base class: dataclasses that save and load as versioned dicts.

Every method config (token merging, quantization, pruning, training, ...) subclasses :class:`Config`.
``to_dict`` gives ``{"name": ..., "version": ..., <fields>}``; ``from_dict`` checks the name, upgrades
older versions through ``_upgrade`` and coerces str-Enum fields, so YAML and CLI strings just work.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="Config")
E = TypeVar("E", bound=enum.Enum)


class StrEnum(str, enum.Enum):
    """An Enum whose members are plain strings (``Backend("torch") == "torch"``)."""

    def __str__(self) -> str:
        return str(self.value)


@dataclasses.dataclass
class Config:
    """Base for every versioned config. Subclasses set ``NAME`` and ``VERSION`` and may override
    ``validate`` (raise :class:`ConfigError`) and ``_upgrade`` (migrate an older dict)."""

    NAME: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1
    FAMILY: ClassVar[str] = "other"  # how sweeps and reports group a transform (token, quant, prune, ...)

    @property
    def deployable(self) -> bool:
        """Whether the model this config makes runs as deployed (False: it only simulates, e.g. fake quantization)."""
        return True

    @property
    def exportable(self) -> bool:
        """Whether a file exported for ONNX Runtime / OpenVINO can hold what this step makes: a deployed model with
        the same shapes for every image (the search leaves the rest out for those targets)."""
        return self.deployable

    @property
    def calibration_images(self) -> int | None:
        """How many calibration images the step reads (None: the calibration's own size)."""
        return getattr(self, "calib_size", None)

    def report_fields(self) -> dict[str, Any]:
        """What reports show of this step besides accuracy and speed (e.g. ``w_bits``, the mean weight width)."""
        return {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(self, f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` when the settings are impossible."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.NAME, "version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        name = data.pop("name", cls.NAME)
        version = int(data.pop("version", cls.VERSION))
        if name != cls.NAME:
            raise ConfigError(f"config is for '{name}', expected '{cls.NAME}'")
        if version > cls.VERSION:
            raise ConfigError(
                f"{cls.NAME} config version {version} is newer than this vitcompress supports ({cls.VERSION})"
            )
        if version < cls.VERSION:
            data = cls._upgrade(data, version)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.NAME} setting(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Migrate a dict written by an older ``version`` of this config."""
        return data

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def upgrade_backend(data: dict[str, Any], version: int, since: int) -> dict[str, Any]:
    """A config dict from before ``since``, when the kernel preference was called ``attention``, with it renamed to
    ``backend`` (the one name every layer and config uses)."""
    if version < since and "attention" in data:
        data = {k: v for k, v in data.items() if k != "attention"} | {"backend": data["attention"]}
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def enum_error(cls: type[enum.Enum], name: str, value: Any) -> ConfigError:
    """The one-line error for ``value`` that is not a member of ``cls``."""
    return ConfigError(f"{name} must be one of: {', '.join(str(m.value) for m in cls)} (got {value!r})")


def parse_enum(cls: type[E], value: Any, name: str) -> E:
    """``cls(value)``, or :func:`enum_error` as a :class:`ConfigError`."""
    try:
        return cls(value)
    except ValueError:
        raise enum_error(cls, name, value) from None


def _coerce(obj: Config, name: str, value: Any) -> Any:
    """Turn strings into the Enum a field is annotated with (also inside Optional/Union)."""
    hints = typing.get_type_hints(type(obj))
    hint = hints.get(name)
    if value is None or hint is None:
        return value
    candidates = typing.get_args(hint) if _is_union(hint) else (hint,)
    if isinstance(value, str) and value.lower() == "none" and type(None) in candidates:
        return None  # YAML and CLI spell an unset optional field "none"
    if isinstance(value, str) and (int in candidates or float in candidates) and str not in candidates:
        try:  # CLI strings for numeric fields ("4", "0.5")
            return int(value) if int in candidates and value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, enum.Enum):
            if isinstance(value, cand):
                return value
            try:
                return cand(value)
            except ValueError:
                if len(candidates) == 1 or all(
                    isinstance(c, type) and issubclass(c, enum.Enum) or c is type(None) for c in candidates
                ):
                    raise enum_error(cand, name, value) from None
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)

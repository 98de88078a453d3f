"""User-facing errors.

Anything a user can cause (a bad model id, a corrupt checkpoint, an empty dataset, impossible settings)
raises :class:`UserError`. The CLI prints it as one line on stderr and exits non-zero, with no traceback;
library users catch it like any other exception.
"""

from __future__ import annotations

import warnings


class UserError(Exception):
    """A problem with the user's input, reported as a one-line message."""

    exit_code: int = 2


class ModelError(UserError):
    """Unknown, unsupported or unloadable model."""


class CheckpointError(ModelError):
    """Missing, corrupt or mismatched checkpoint or artifact."""


class DataError(UserError):
    """Missing, empty or unreadable dataset."""


class ConfigError(UserError):
    """Impossible or malformed settings."""


class WriteError(UserError):
    """A file could not be written (full disk, file size limit, read-only or forbidden folder, I/O error), or a
    folder is being written by another process. Nothing previous is lost."""


class Note(UserWarning):
    """Something the user should know that is not an error (a fresh classifier, a clamped setting). The CLI prints
    it as one line, ``note: ...``, on stderr; library users see an ordinary warning."""


def note(message: str) -> None:
    """Emit ``message`` as a :class:`Note`."""
    warnings.warn(message, Note, stacklevel=2)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type name when it has none:
    what a one-line error shows of a third-party exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def check_positive(name: str, value: int | None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None or an integer >= 1."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")

"""Atomic file writes: write a temporary sibling, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError:
    """A one-line :class:`WriteError` for an OS error met writing ``path`` (its cause in words: no space left,
    file too large, read-only file system, permission denied, I/O error)."""
    text = str(exc).strip()
    cause = getattr(exc, "strerror", None) or (text.splitlines()[0][:200] if text else type(exc).__name__)
    return WriteError(f"cannot write {path}: {cause}")


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``path``; readers never see a partial file. An OS error
    (a full disk, a read-only folder, ...) is a one-line :class:`WriteError`, and ``path`` keeps what it held."""
    path = Path(path)
    try:
        return _atomic_write(path, writer, suffix)
    except OSError as exc:
        raise write_error(path, exc) from None


def _atomic_write(path: Path, writer: Callable[[str], None], suffix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a normal file's mode
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json_text(obj))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every vitcompress file uses (enums, paths and tensors of one value handled)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool) -> Iterator[bool]:
    """Hold an advisory lock (``flock``) on ``path`` (created if needed): yields True once held, or False at once
    when another process holds it and ``wait`` is False. Released on exit, and by the OS if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """``$VITCOMPRESS_CACHE`` or ``~/.cache/vitcompress``: trained testbeds and per-machine measurements."""
    return Path(os.environ.get("VITCOMPRESS_CACHE") or Path.home() / ".cache" / "vitcompress")


def cached_tensors(path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors stored at ``path`` (safetensors), else ``compute()``'s, written there atomically; returns them and
    whether they came from the file. A damaged file is computed again."""
    if path.is_file():
        with contextlib.suppress(Exception):
            return load_file(str(path)), True
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp),
                 suffix=".tmp.safetensors")
    return tensors, False

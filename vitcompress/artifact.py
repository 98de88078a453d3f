"""vitcompress artifacts: a directory with ``model.safetensors`` and ``vitcompress.json``.

The manifest holds a schema version, the timm id and kwargs, the ordered transforms (each with its config
and recorded state), the uncompressed base, provenance and the last measured metrics, plus the size and
SHA-256 of the weights file, so that a truncated or swapped weights file is caught at load time.

An artifact is committed as one unit. Each save writes a new version folder, ``OUT/.v-<id>/`` (the weights, hashed
from the file this process wrote, then the manifest), and then flips one symbolic link, ``OUT/vitcompress.json ->
.v-<id>/vitcompress.json``, with one atomic rename: a reader resolves that link once and reads both files from the
version it names, so it sees the old artifact or the new one, never a mix, and a writer killed at any instant
leaves the previous artifact intact. ``OUT/model.safetensors`` is a second link, for people and tools that open
the weights by name. One writer at a time: an advisory lock (``OUT/.lock``) is held from the start of a command
to its save. A later writer removes what a killed one left (old version folders, temporary files) and nothing
else. Artifacts with the two files side by side (before 2026-12) load as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, WriteError
from .io import file_lock, json_text, write_error
from .models import model_info
from .provenance import utc_now, versions

MANIFEST = "vitcompress.json"
WEIGHTS = "model.safetensors"
FORMAT = "vitcompress-artifact"
SCHEMA_VERSION = 1
WEIGHTS_METADATA = {"format": "pt"}
LOCK = ".lock"
VERSION_PREFIX = ".v-"
# what this module writes inside an artifact folder besides the two names: a later writer may remove these
_OWN = re.compile(r"^(\.lock|\.v-[0-9a-f]{32}|\.(model\.safetensors|vitcompress\.json)\.[^/]*\.tmp)$")


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def version_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the current manifest and weights of the artifact at ``path``: the version the manifest
    link names, or ``path`` itself for an artifact with the two files side by side."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_symlink():
        return path
    target = Path(os.readlink(mpath))
    if target.is_absolute() or len(target.parts) != 2 or not target.parts[0].startswith(VERSION_PREFIX):
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} links outside the artifact ({target})")
    return path / target.parts[0]


def own_leftovers(out: Path) -> list[Path]:
    """What a vitcompress writer left in ``out`` besides the committed artifact: version folders no manifest names,
    temporary files, the lock."""
    current = version_dir(out) if (out / MANIFEST).is_symlink() else None
    return [p for p in out.iterdir() if _OWN.match(p.name) and p != current and p.name != LOCK]


def only_own_files(out: Path) -> bool:
    """Whether ``out`` holds nothing but files a vitcompress writer made (a killed writer's leftovers)."""
    return all(_OWN.match(p.name) for p in out.iterdir())


_HELD: dict[str, int] = {}  # resolved folder -> depth: the lock is re-entrant within a process


@contextlib.contextmanager
def writer_lock(out: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold the advisory write lock of the artifact folder ``out`` (created if needed). Another process holding it
    is a one-line :class:`WriteError`, or, with ``wait``, waited for. Re-entrant within one process."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = str(out.resolve())
    except OSError as exc:
        raise write_error(out, exc) from None
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    with contextlib.ExitStack() as stack:
        try:  # only taking the lock is wrapped: the caller's own errors pass through unchanged
            held = stack.enter_context(file_lock(out / LOCK, wait=wait))
        except OSError as exc:
            raise write_error(out, exc) from None
        if not held:
            raise WriteError(f"{out} is being written by another vitcompress process (it holds {out / LOCK}): "
                             "wait for it or choose another --out")
        _HELD[key] = 1
        try:
            yield out
        finally:
            del _HELD[key]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors stores it: contiguous CPU tensors, shared storage un-shared. A parameter that
    several modules share (one Parameter under several keys: MiniViT) is stored once, under its first key; loading
    fills the others from it (:func:`vitcompress.models.load_state_dict_strict`)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    params: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, nn.Parameter):
            if id(v) in params:
                continue
            params.add(id(v))
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    return tensors


def check_writable(out: str | os.PathLike) -> Path:
    """``out`` as a Path if an artifact may be written there: a new path, an empty folder or an artifact (which
    is replaced). Anything else is a user's file or folder, and is refused rather than overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write artifact: {out} exists and is not a directory")
    if out.is_dir() and not is_artifact(out) and not only_own_files(out):
        raise CheckpointError(f"refusing to write into {out}: it exists, is not empty and is not a vitcompress "
                              "artifact (choose a new --out)")
    return out


def save_artifact(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory ``out`` (created if needed) and return its path."""
    info = model_info(model)
    if metrics is not None:
        info.metrics = dict(metrics)
    if provenance:
        info.provenance.update(provenance)
    out = check_writable(out)
    tensors = weight_tensors(model)
    with writer_lock(out):
        try:
            _commit(out, tensors, info)
        except OSError as exc:
            raise write_error(out, exc) from None
        except Exception as exc:  # safetensors reports a failed write (EFBIG, ENOSPC) as its own error type
            if type(exc).__name__ == "SafetensorError":
                raise write_error(out, exc) from None
            raise
    info.source = str(out.resolve())
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(out: Path, name: str, target: str) -> None:
    """Point ``out/name`` at ``target`` with one atomic rename (a temporary link first)."""
    tmp = out / f".{name}.{uuid.uuid4().hex}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, out / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _crash_point(name: str) -> None:
    """Fault injection for the tests: ``VITCOMPRESS_CRASH_AT=name`` kills this process here, as a power cut or
    ``kill -9`` would (tests/test_faults.py)."""
    if os.environ.get("VITCOMPRESS_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _commit(out: Path, tensors: dict[str, torch.Tensor], info: Any) -> None:
    """Write a new version folder and flip the manifest link to it (the caller holds the lock)."""
    for p in own_leftovers(out):  # a killed writer's version folders and temporary files
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    vid = f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    vdir = out / vid
    vdir.mkdir()
    save_file(tensors, str(vdir / WEIGHTS), metadata=WEIGHTS_METADATA)
    _fsync(vdir / WEIGHTS)
    _crash_point("weights")
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": {"arch": info.arch, "kwargs": info.kwargs},
        "transforms": info.transforms,
        "base": _relative_base(info.base, out),
        "provenance": {**info.provenance, "saved": utc_now(), "versions": versions()},
        "metrics": info.metrics,
        # the file this process wrote, hashed before anything points at it
        "files": {WEIGHTS: {"bytes": (vdir / WEIGHTS).stat().st_size, "sha256": sha256_file(vdir / WEIGHTS)}},
    }
    (vdir / MANIFEST).write_text(json_text(manifest))
    _fsync(vdir / MANIFEST)
    _fsync(vdir)
    old = version_dir(out) if (out / MANIFEST).is_symlink() else None
    _crash_point("manifest")
    _link(out, MANIFEST, f"{vid}/{MANIFEST}")  # the commit point
    _fsync(out)
    _crash_point("committed")
    _link(out, WEIGHTS, f"{vid}/{WEIGHTS}")
    if old is not None and old != vdir:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated manifest of the artifact at ``path``."""
    return _read_manifest(Path(path), version_dir(path))


def _read_manifest(path: Path, vdir: Path) -> dict[str, Any]:
    mpath = vdir / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"not a vitcompress artifact: {path} (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} is not a vitcompress manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(f"artifact {path} has schema version {version!r}; this vitcompress reads up to "
                              f"{SCHEMA_VERSION}: upgrade vitcompress")
    if not isinstance(manifest.get("model"), dict) or "arch" not in manifest["model"]:
        raise CheckpointError(f"artifact {path} is corrupt: {MANIFEST} names no model")
    return manifest


def read_weights(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the state dict of the artifact at ``path``, checked against the manifest's size and
    SHA-256 when ``verify``. Rebuilding the model from them is :func:`vitcompress.pipeline.load_artifact`."""
    path = Path(path)
    for attempt in range(3):  # a writer may replace the version between resolving the link and opening its files
        vdir = version_dir(path)
        try:
            return _read_weights(path, vdir, verify)
        except CheckpointError:
            if attempt == 2 or version_dir(path) == vdir:
                raise
    raise AssertionError("unreachable")


def _read_weights(path: Path, vdir: Path, verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    manifest = _read_manifest(path, vdir)
    wpath = vdir / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"artifact {path} is incomplete: {WEIGHTS} is missing")
    expected = manifest.get("files", {}).get(WEIGHTS, {})
    if verify and expected and (wpath.stat().st_size != expected.get("bytes")
                                or sha256_file(wpath) != expected.get("sha256")):
        raise CheckpointError(f"artifact {path} is corrupt: {WEIGHTS} does not match {MANIFEST} "
                              "(truncated or replaced)")
    try:
        sd = load_file(str(wpath))
    except Exception as exc:
        raise CheckpointError(f"artifact {path} is corrupt: cannot read {WEIGHTS} ({type(exc).__name__})") from None
    return manifest, sd


def _relative_base(base: dict[str, Any] | None, out: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    target = Path(base["path"]).resolve()
    if target == out.resolve():
        return None
    return {**base, "path": os.path.relpath(target, out.resolve())}


def absolute_base(base: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    if not base or base.get("kind") != "artifact":
        return base
    return {**base, "path": str((path / base["path"]).resolve())}

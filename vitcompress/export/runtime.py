"""Run an exported file inside the project's harness: a :class:`RuntimeModel` is an ``nn.Module`` whose forward
calls ONNX Runtime, OpenVINO or a loaded ``torch.export`` program, so ``predict``, agreement and timing treat it
like any model. It carries the export's metadata: the data config to preprocess for, the source artifact (the
default reference for agreement), the recorded transforms and GFLOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import StrEnum, parse_enum
from ..errors import ConfigError, ModelError, first_line
from ..models import INFO_ATTR, ModelInfo
from .onnx import read_metadata, verify_export

EXPORTED_SUFFIXES = (".onnx", ".pt2")


class Runtime(StrEnum):
    """Where a model runs: the one word that export, sweeps and the search share. torch: eager (and an exported
    ``.pt2`` file); torch-compile: compiled (:mod:`vitcompress.bench.compiled`); cuda: compiled with CUDA graphs on
    the GPU (a search target); onnxruntime / openvino: the model's ONNX export in that runtime."""

    TORCH = "torch"
    TORCH_COMPILE = "torch-compile"
    CUDA = "cuda"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"

    @property
    def exported(self) -> bool:
        """Runs the model's ONNX export rather than the torch model."""
        return self in (Runtime.ONNXRUNTIME, Runtime.OPENVINO)

    @property
    def compiled(self) -> bool:
        return self in (Runtime.TORCH_COMPILE, Runtime.CUDA)


def is_exported(name: str | Path) -> bool:
    return Path(str(name)).suffix in EXPORTED_SUFFIXES and Path(str(name)).is_file()


def _ort_session(path: Path, opts: dict[str, Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in opts.items():
        if key.startswith("session."):  # a session config entry, e.g. session.qdq_matmulnbits_accuracy_level
            so.add_session_config_entry(key, str(value))
            continue
        if not hasattr(so, key):
            raise ConfigError(f"--runtime-opts: onnxruntime.SessionOptions has no '{key}'")
        setattr(so, key, value)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _openvino(path: Path, opts: dict[str, Any]) -> Any:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {k: str(v) for k, v in opts.items()})
    return lambda x: compiled(x)[0]


class RuntimeModel(nn.Module):
    """An exported model: x [B,3,H,W] float32 -> logits [B,C] float32 on the CPU, run by ``runtime``.

    A static-batch export is fed in chunks of its batch size (the last chunk zero-padded and cut). ``meta``: the
    metadata of a file that has none of its own (a peer tool's output, e.g. NNCF's OpenVINO IR ``.xml``).
    """

    def __init__(self, path: str | Path, runtime: Runtime | str | None = None, opts: dict[str, Any] | None = None,
                 verify: bool = True, meta: dict[str, Any] | None = None):
        super().__init__()
        self.path = Path(path)
        default = Runtime.TORCH if self.path.suffix == ".pt2" else Runtime.ONNXRUNTIME
        self.runtime = parse_enum(Runtime, runtime or default, "runtime")
        if self.runtime.compiled:
            raise ConfigError(f"runtime {self.runtime} compiles torch models; an exported file runs in onnxruntime, "
                              "openvino or (.pt2) torch")
        if not self.path.is_file():
            raise ModelError(f"exported model not found: {self.path}")
        try:
            self.meta = meta or read_metadata(self.path)
        except Exception as exc:  # a corrupt or foreign file: one line naming it
            raise ModelError(f"{self.path} is not a readable ONNX/pt2 file: {type(exc).__name__}") from None
        if not self.meta:
            raise ModelError(f"{self.path} has no vitcompress metadata: export it with `vitcompress export`")
        if verify and meta is None:  # a damaged weight is refused before it runs (6 % agreement, silently, otherwise)
            verify_export(self.path, self.meta)
        if (self.runtime == Runtime.TORCH) != (self.path.suffix == ".pt2"):
            raise ConfigError(f"runtime {self.runtime} cannot run a {self.path.suffix} file")
        self.opts = dict(opts or {})
        batch = self.meta["export"]["batch_size"]
        self.static_batch = None if batch == "dynamic" else int(batch)
        dc = dict(self.meta["data_config"])
        dc["input_size"] = tuple(dc["input_size"])
        self.exported_data_config = dc
        self._run = self._load()
        base = {"kind": "artifact", "path": self.meta["source"]} if self.meta.get("source") else self.meta.get("base")
        setattr(self, INFO_ATTR, ModelInfo(
            arch=self.meta["arch"], kwargs=self.meta.get("kwargs") or {}, base=base, source=str(self.path),
            transforms=[*self.meta.get("transforms", []), {"name": f"export:{self.runtime}",
                                                           "config": self.meta["export"], "state": {}}],
            provenance=self.meta.get("provenance") or {}, metrics=self.meta.get("metrics") or {}))

    def _load(self) -> Any:
        try:
            if self.runtime == Runtime.ONNXRUNTIME:
                return _ort_session(self.path, self.opts)
            if self.runtime == Runtime.OPENVINO:
                return _openvino(self.path, self.opts)
            prog = torch.export.load(str(self.path)).module()
            return lambda x: prog(torch.from_numpy(x)).detach().numpy()
        except ImportError as exc:
            raise ConfigError(f"runtime {self.runtime} is not installed ({exc.name}): pip install "
                              "'vitcompress[export]'") from None
        except ConfigError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.runtime} cannot load {self.path}: {type(exc).__name__}: "
                             f"{first_line(exc)}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().float().cpu().numpy()
        n = self.static_batch
        if n is None or a.shape[0] == n:
            return torch.from_numpy(np.asarray(self._run(a))).float()
        outs = []
        for i in range(0, a.shape[0], n):
            chunk = a[i:i + n]
            pad = np.concatenate([chunk, np.zeros((n - len(chunk), *a.shape[1:]), a.dtype)]) if len(chunk) < n \
                else chunk
            outs.append(np.asarray(self._run(pad))[:len(chunk)])
        return torch.from_numpy(np.concatenate(outs)).float()

    def static_metrics(self) -> dict[str, Any]:
        """params and GFLOPs recorded at export, and the file's size on disk in MiB."""
        gflops = self.meta.get("gflops")
        return {"params": self.meta.get("params"), "gflops": gflops, "gmacs": None if gflops is None else gflops / 2,
                "size_mb": sum(p.stat().st_size for p in (self.path, self.path.with_suffix(".bin"))
                               if p.is_file()) / 2**20}  # an OpenVINO IR keeps its weights in the .bin


def load_runtime_model(path: str | Path, runtime: Runtime | str | None = None,
                       opts: dict[str, Any] | None = None, verify: bool = True) -> RuntimeModel:
    """The exported file at ``path`` as an ``nn.Module`` run by ``runtime`` (default: by its suffix), its weights
    checked against the export's checksum unless ``verify`` is False."""
    return RuntimeModel(path, runtime, opts, verify)

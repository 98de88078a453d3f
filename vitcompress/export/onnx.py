"""Export a (compressed) ViT to ONNX, with W8A8 as standard QDQ, or to a ``torch.export`` program (.pt2).

The model is first rewritten into an *exportable copy* (:func:`exportable`): each deployed int8 layer becomes a
:class:`QDQLinear`, whose fake-quant ops the ONNX exporter writes as QuantizeLinear / DequantizeLinear; block-sparse
layers become dense ``nn.Linear``; token merging runs as traced tensor ops with its recorded static schedule.
Whatever has no faithful ONNX form (simulated quantization, per-token activations, fp8, int4) is refused with a
one-line reason. After export, :func:`fold_weight_quantizers` stores every quantized weight as an int8 initializer
(QuantizeLinear on a constant becomes the constant's codes), so the file really holds int8 weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..artifact import sha256_file
from ..bench import count_flops
from ..config import Config, StrEnum
from ..errors import ConfigError, ModelError, first_line
from ..io import atomic_write, atomic_write_bytes, atomic_write_text
from ..models import data_config, model_info
from ..transforms.layers import replace_module, use_torch_references_
from ..transforms.quantize.qdq import QdqActivations, QdqForm, QDQLinear  # noqa: F401  (re-exported)
from ..ui import step

META_KEY = "vitcompress"  # ONNX metadata_props key: the JSON of :func:`metadata`


class Format(StrEnum):
    ONNX = "onnx"
    PT2 = "pt2"


@dataclasses.dataclass
class ExportConfig(Config):
    """How ``vitcompress export`` writes a model. batch_size: an int (static) or "dynamic". qdq_weight_bits: 8, or 7
    (codes on +-63) for runtimes on CPUs without VNNI, whose u8 x s8 GEMM saturates in int16 with 8-bit codes."""

    NAME = "export"
    VERSION = 2  # v2: qdq_weight_bits (older dicts: 8, what they wrote)

    format: Format = Format.ONNX
    batch_size: Any = "dynamic"
    opset: int = 17
    qdq_activations: QdqActivations = QdqActivations.INT8
    qdq_weight_bits: int = 8

    def validate(self) -> None:
        if self.batch_size != "dynamic":
            try:
                self.batch_size = int(self.batch_size)
            except (TypeError, ValueError):
                raise ConfigError(f"batch_size is a positive integer or 'dynamic', got '{self.batch_size}'") from None
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.qdq_weight_bits not in (7, 8):
            raise ConfigError(f"qdq_weight_bits is 8, or 7 for CPUs without VNNI, got {self.qdq_weight_bits}")
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset must be in 13..21 (per-channel QDQ needs 13), got {self.opset}")


def exportable(model: nn.Module, cfg: ExportConfig) -> tuple[nn.Module, list[str]]:
    """A float32 CPU copy of ``model`` that exports faithfully, and notes on what changed form.

    Each method family says how its layers export (the family protocol, see ARCHITECTURE.md): a layer with
    ``_vc_export_refusal`` has no faithful form and is refused in one line (:class:`ConfigError`); a layer with
    ``export_form(QdqForm)`` is replaced by what it returns (its ``export_note``, if any, is reported).
    """
    for name, mod in model.named_modules():  # what a family declares it cannot export, refused in one line
        refusal = getattr(mod, "_vc_export_refusal", None)
        if refusal:
            raise ConfigError(f"{name}: {refusal}")
        if getattr(mod, "_vc_dynamic_shapes", False):
            raise ConfigError(f"{name} keeps a per-image token count (adaptive tokens or learned thresholds): an "
                              "exported graph has static shapes; export a fixed schedule (merge --r or "
                              "--target-flops) instead")
    m = copy.deepcopy(model).float().cpu().eval()
    use_torch_references_(m)  # Triton drop-ins (fused attention, ...) export through their torch reference
    notes: list[str] = []
    for name, mod in list(m.named_modules()):
        if not hasattr(mod, "export_form"):
            continue
        try:
            new = mod.export_form(QdqForm(cfg.qdq_activations, cfg.qdq_weight_bits))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        note = getattr(mod, "export_note", None)
        if note and note not in notes:
            notes.append(note)
        replace_module(m, name, new)
    return m, notes


def metadata(model: nn.Module, cfg: ExportConfig, notes: list[str]) -> dict[str, Any]:
    """What the file must not lose: the source, its transforms, base, metrics and data config."""
    info = model_info(model)
    dc = data_config(model)
    return {"format_version": 1, "export": cfg.to_dict(), "notes": notes, "arch": info.arch, "kwargs": info.kwargs,
            "source": info.source, "base": info.base, "transforms": info.transforms, "metrics": info.metrics,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()},
            "params": sum(p.numel() for p in model.parameters()), "provenance": info.provenance,
            "gflops": count_flops(model, dc["input_size"]) / 1e9}


def _value(graph: Any, name: str) -> Any:
    """The numpy value of initializer, Constant or Identity-of-constant ``name`` (None when it is computed)."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Identity" and node.output[0] == name:  # the exporter's de-duplicated initializers
            return _value(graph, node.input[0])
    return None


def fold_weight_quantizers(proto: Any) -> int:
    """Replace QuantizeLinear(constant weight) by the weight's int8 codes; drop the float weight. Returns the count."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    folded = 0
    for node in list(g.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w, scale, zero = (_value(g, n) for n in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        s = scale.reshape(shape) if scale.ndim else scale
        codes = np.clip(np.rint(w / s) + zero.reshape(shape if zero.ndim else ()), -128, 127).astype(zero.dtype)
        g.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        g.node.remove(node)
        if not any(node.input[0] in n.input for n in g.node):
            g.initializer.remove(inits[node.input[0]])
        folded += 1
    return folded


def export_model(model: nn.Module, out: str | Path, cfg: ExportConfig | None = None) -> dict[str, Any]:
    """Write ``model`` to ``out`` (refused if it exists); returns a summary (file, size, notes, qdq counts)."""
    cfg = cfg or ExportConfig()
    out = Path(out)
    if out.suffix != f".{cfg.format}":
        raise ConfigError(f"--out {out} must end in .{cfg.format} for --format {cfg.format}")
    if out.exists():
        raise ConfigError(f"{out} exists: vitcompress never overwrites a file; choose another --out")
    m, notes = exportable(model, cfg)
    meta = metadata(model, cfg, notes)
    c, h, w = meta["data_config"]["input_size"]
    x = torch.randn(cfg.batch_size if cfg.batch_size != "dynamic" else 2, c, h, w)
    summary: dict[str, Any] = {"file": str(out), "format": str(cfg.format), "notes": notes}
    with step(f"export: {cfg.format} to {out}"):
        summary = _write(m, x, out, cfg, meta, summary)
    summary["size_mb"] = round(out.stat().st_size / 2**20, 3)
    return summary


def _write(m: nn.Module, x: torch.Tensor, out: Path, cfg: ExportConfig, meta: dict[str, Any],
           summary: dict[str, Any]) -> dict[str, Any]:
    """Trace ``m`` on ``x`` and write ``out`` atomically (ONNX or a torch.export program); one-line errors."""
    try:
        if cfg.format == Format.PT2:
            dims = {"x": {0: torch.export.Dim("batch", min=1)}} if cfg.batch_size == "dynamic" else None
            prog = torch.export.export(m, (x,), dynamic_shapes=dims)
            atomic_write(out, lambda tmp: torch.export.save(prog, tmp, extra_files={META_KEY: json.dumps(meta)}),
                         suffix=".tmp.pt2")  # torch warns about an archive name not ending in .pt2
            atomic_write_text(out.with_name(out.name + ".sha256"), f"{sha256_file(out)}  {out.name}\n")
        else:
            summary.update(_export_onnx(m, x, out, cfg, meta))
    except ConfigError:
        raise
    except Exception as exc:  # the exporters raise many types; the user gets one line naming the cause
        raise ModelError(f"export to {cfg.format} failed: {type(exc).__name__}: {first_line(exc, 300)}") from None
    return summary


def _export_onnx(m: nn.Module, x: torch.Tensor, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    dyn = {"input": {0: "batch"}, "logits": {0: "batch"}} if cfg.batch_size == "dynamic" else None
    with warnings.catch_warnings():  # the TorchScript exporter warns about tracing; the round trip checks it
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter turns fake-quant ops into QuantizeLinear/DequantizeLinear pairs
        torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=cfg.opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=dyn, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    folded = fold_weight_quantizers(proto)
    # the tracer annotates some intermediate shapes wrongly under a dynamic batch (token merging's gathers): drop
    # the annotations; runtimes infer shapes themselves
    del proto.graph.value_info[:]
    _drop_branch_shapes(proto.graph)
    meta = {**meta, "weights_sha256": weights_digest(proto)}  # eval checks it before it runs the file
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, default=str))
    onnx.checker.check_model(proto)
    atomic_write_bytes(out, proto.SerializeToString())
    ops = [n.op_type for n in proto.graph.node]
    return {"int8_weights": folded, "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear")}


def _drop_branch_shapes(graph: Any) -> None:
    """Clear the shapes declared for the values inside control-flow subgraphs (the ``If`` branches the tracer emits
    around token merging's gathers): the tracer gives one branch's rank to both, and ONNX Runtime then warns on every
    run. Runtimes infer the shapes themselves."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                del sub.value_info[:]
                for out in sub.output:
                    out.type.tensor_type.ClearField("shape")
                _drop_branch_shapes(sub)


def weights_digest(proto: Any) -> str:
    """SHA-256 of an ONNX graph's initializers (names and serialized tensors, in order): what a damaged weight
    changes."""
    h = hashlib.sha256()
    for init in proto.graph.initializer:
        h.update(init.name.encode())
        h.update(init.SerializeToString())
    return h.hexdigest()


def verify_export(path: str | Path, meta: dict[str, Any]) -> None:
    """ModelError unless the exported file's weights match the checksum recorded at export: the initializers'
    digest in an .onnx file's metadata, the whole file's in a .pt2's ``.sha256`` sidecar. Files exported before
    checksums existed carry none and pass."""
    path = Path(path)
    if path.suffix == ".pt2":
        side = path.with_name(path.name + ".sha256")
        want, got = (side.read_text().split()[0], sha256_file(path)) if side.is_file() else (None, None)
    else:
        want = meta.get("weights_sha256")
        got = weights_digest(onnx.load(str(path))) if want else None
    if want and want != got:
        raise ModelError(f"{path} is corrupt: its weights do not match the checksum recorded at export (re-export "
                         "it, or pass --no-verify to run it anyway)")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The vitcompress metadata of an exported .onnx or .pt2 file ({} when it has none)."""
    path = Path(path)
    if path.suffix == ".pt2":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"extra/{META_KEY}")]
            return json.loads(z.read(names[0])) if names else {}
    proto = onnx.load(str(path), load_external_data=False)
    return next((json.loads(p.value) for p in proto.metadata_props if p.key == META_KEY), {})


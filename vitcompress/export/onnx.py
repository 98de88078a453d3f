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
from ..transforms.prune.block_sparse_linear import BlockSparseLinear
from ..transforms.quantize.int8_linear import Int8Linear
from ..transforms.quantize.lowbit_linear import Fp8Linear, WeightOnlyLinear
from ..transforms.quantize.simulate import FakeQuantConv2d, FakeQuantLinear, QuantAttention

META_KEY = "vitcompress"  # ONNX metadata_props key: the JSON of :func:`metadata`


class Format(StrEnum):
    ONNX = "onnx"
    PT2 = "pt2"


class QdqActivations(StrEnum):
    INT8 = "int8"  # symmetric, zero point 0: what TensorRT takes
    UINT8 = "uint8"  # the same grid shifted by 128 (zero point 128): what ONNX Runtime's x86 kernels prefer


@dataclasses.dataclass
class ExportConfig(Config):
    """How ``vitcompress export`` writes a model. batch_size: an int (static) or "dynamic"."""

    NAME = "export"
    VERSION = 1

    format: Format = Format.ONNX
    batch_size: Any = "dynamic"
    opset: int = 17
    qdq_activations: QdqActivations = QdqActivations.INT8

    def validate(self) -> None:
        if self.batch_size != "dynamic":
            try:
                self.batch_size = int(self.batch_size)
            except (TypeError, ValueError):
                raise ConfigError(f"batch_size is a positive integer or 'dynamic', got '{self.batch_size}'") from None
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset must be in 13..21 (per-channel QDQ needs 13), got {self.opset}")


class QDQLinear(nn.Module):
    """x [..., in] -> [..., out] as ONNX writes it: (optional) activation fake-quant per tensor, then a MatMul with
    the per-channel int8 weight. Buffers: weight_t float32 [in, out] (codes x scale, exact), w_scale [out],
    a_scale [] (absent for weight-only)."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 a_scale: torch.Tensor | None, act_dtype: QdqActivations):
        super().__init__()
        self.register_buffer("weight_t", (codes.float() * w_scale[:, None].float()).t().contiguous())
        self.register_buffer("w_scale", w_scale.float().clone())
        self.register_buffer("w_zero", torch.zeros_like(w_scale, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.a_scale = None if a_scale is None else float(a_scale)
        self.a_zero, self.a_range = (128, (0, 255)) if act_dtype == QdqActivations.UINT8 else (0, (-128, 127))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_scale is not None:
            x = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, *self.a_range)
        w = torch.fake_quantize_per_channel_affine(self.weight_t, self.w_scale, self.w_zero, 1, -128, 127)
        out = torch.matmul(x, w)
        return out if self.bias is None else out + self.bias


def _dense_linear(mod: BlockSparseLinear) -> nn.Linear:
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(mod.dense_weight(torch.float32))
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.float())
    return lin


def exportable(model: nn.Module, cfg: ExportConfig) -> tuple[nn.Module, list[str]]:
    """A float32 CPU copy of ``model`` that exports faithfully, and notes on what changed form.

    Raises :class:`ConfigError` (one line) for what has no faithful ONNX form.
    """
    for name, mod in model.named_modules():  # what a family declares it cannot export, refused in one line
        if getattr(mod, "_vc_dynamic_shapes", False):
            raise ConfigError(f"{name} keeps a per-image token count (adaptive tokens or learned thresholds): an "
                              "exported graph has static shapes; export a fixed schedule (merge --r or "
                              "--target-flops) instead")
        refusal = getattr(mod, "_vc_export_refusal", None)
        if refusal:
            raise ConfigError(f"{name}: {refusal}")
    m = copy.deepcopy(model).float().cpu().eval()
    use_torch_references_(m)  # Triton drop-ins (fused attention, ...) export through their torch reference
    notes: list[str] = []
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (FakeQuantLinear, FakeQuantConv2d, QuantAttention)):
            raise ConfigError(f"{name} is simulated quantization (an accuracy study): export needs --mode deploy")
        if isinstance(mod, Fp8Linear):
            raise ConfigError(f"{name} is fp8: ONNX Runtime and OpenVINO have no fp8 GEMM on a CPU; export int8")
        if isinstance(mod, Int8Linear):
            if mod.per_token:
                raise ConfigError(f"{name} quantizes activations per token on the fly, which has no static QDQ form: "
                                  "quantize with --a-granularity per_tensor (calibrated)")
            new = QDQLinear(mod.w_int8, mod.w_scale, mod.bias, mod.a_scale, cfg.qdq_activations)
        elif isinstance(mod, WeightOnlyLinear):
            if mod.bits != 8 or mod.group_size:
                raise ConfigError(f"{name} is int{mod.bits}" + (f" in groups of {mod.group_size}" if mod.group_size
                                                                 else "") + ": only per-channel int8 weights export")
            new = QDQLinear(mod.codes(), mod.w_scale[:, 0], mod.bias, None, cfg.qdq_activations)
        elif isinstance(mod, BlockSparseLinear):
            new = _dense_linear(mod)
            note = "block-sparse layers export as dense (masked) weights: ONNX has no block-sparse GEMM"
            if note not in notes:
                notes.append(note)
        else:
            continue
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
    summary["size_mb"] = round(out.stat().st_size / 2**20, 3)
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


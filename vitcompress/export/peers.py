"""The peer tools, run on the same model and images as ours so that their figures stand beside ours in one table.

- ``ort_quantize_static``: ONNX Runtime's own post-training quantization (QDQ, per-channel int8 weights, uint8
  activations, MinMax) on our dense ONNX export, after ``quant_pre_process``;
- ``nncf``: ``nncf.quantize`` (``ModelType.TRANSFORMER``: SmoothQuant, quantized attention matmuls) on the dense
  export read by OpenVINO;
- ``nncf_accuracy_control``: ``nncf.quantize_with_accuracy_control``, which quantizes the same way and then reverts
  layers to floating point, most sensitive first, until the top-1 on the validation images drops by at most
  ``max_drop`` points.

Each returns a :class:`~vitcompress.export.runtime.RuntimeModel` carrying the dense export's metadata, so the
sweep measures it like any exported point.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from ..config import StrEnum, parse_enum
from ..errors import ConfigError
from .onnx import export_model, read_metadata
from .runtime import Runtime, RuntimeModel


class Peer(StrEnum):
    ORT_QUANTIZE_STATIC = "ort_quantize_static"
    NNCF = "nncf"
    NNCF_ACCURACY_CONTROL = "nncf_accuracy_control"


def peer_model(peer: Peer | str, model: nn.Module, calib: Sequence[np.ndarray], workdir: Path,
               runtime: Runtime | str, validation: Sequence[tuple[np.ndarray, np.ndarray]] = (),
               max_drop: float = 1.0) -> RuntimeModel:
    """``peer``'s int8 version of the dense ``model``, calibrated on ``calib`` (arrays [B,3,H,W]), run by ``runtime``.

    Files go to ``workdir``. NNCF's models run only in OpenVINO. The accuracy-control peer validates on
    ``validation`` ((images [B,3,H,W], labels [B]) batches) within ``max_drop`` top-1 points.
    """
    peer, runtime = parse_enum(Peer, peer, "peer"), parse_enum(Runtime, runtime, "runtime")
    dense = workdir / "dense.onnx"
    export_model(model, dense)
    meta = read_metadata(dense)
    meta["transforms"] = [*meta.get("transforms", []), {"name": f"peer:{peer}", "config": {}, "state": {}}]
    try:
        if peer == Peer.ORT_QUANTIZE_STATIC:
            return RuntimeModel(_ort_quantize_static(dense, workdir / "ort_static.onnx", calib), runtime, meta=meta)
        if runtime != Runtime.OPENVINO:
            raise ConfigError(f"the {peer} peer's model is an OpenVINO model: run it with runtime openvino")
        if peer == Peer.NNCF_ACCURACY_CONTROL:
            if not validation:
                raise ConfigError("the nncf_accuracy_control peer needs validation images (the sweep's eval data)")
            return RuntimeModel(_nncf_ac(dense, workdir / "nncf_ac.xml", calib, validation, max_drop), runtime,
                                meta=meta)
        return RuntimeModel(_nncf(dense, workdir / "nncf.xml", calib), runtime, meta=meta)
    except ImportError as exc:
        raise ConfigError(f"the {peer} peer needs {exc.name}: pip install 'vitcompress[export]'") from None


def _ort_quantize_static(dense: Path, out: Path, calib: Sequence[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(dense), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _nncf(dense: Path, out: Path, calib: Sequence[np.ndarray]) -> Path:
    import nncf
    import openvino as ov

    q = nncf.quantize(ov.Core().read_model(str(dense)), nncf.Dataset(list(calib)),
                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))  # items = batches
    ov.save_model(q, str(out))
    return out


def _nncf_ac(dense: Path, out: Path, calib: Sequence[np.ndarray], validation: Sequence[tuple[np.ndarray, np.ndarray]],
             max_drop: float) -> Path:
    import nncf
    import openvino as ov

    def top1(compiled: object, items: object) -> float:
        hits = total = 0
        for x, y in items:  # type: ignore[attr-defined]
            pred = np.asarray(compiled(x)[0]).argmax(-1)  # type: ignore[operator]
            hits, total = hits + int((pred == y).sum()), total + len(y)
        return hits / max(total, 1)

    q = nncf.quantize_with_accuracy_control(
        ov.Core().read_model(str(dense)), nncf.Dataset(list(calib)), nncf.Dataset(list(validation)),
        validation_fn=lambda compiled, items: (top1(compiled, items), None), max_drop=max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(q, str(out))
    return out

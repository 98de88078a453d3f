"""Export to ONNX (W8A8 as QDQ) and ``torch.export``, and run exported files in ONNX Runtime, OpenVINO or torch.

``onnx``: :class:`ExportConfig` and :func:`export_model` (needs ``onnx``); ``runtime``: :class:`RuntimeModel`, an
``nn.Module`` over an exported file (needs the runtime: ``pip install 'vitcompress[export]'``).
"""

from .onnx import ExportConfig, Format, QdqActivations, QDQLinear, export_model, read_metadata
from .runtime import Runtime, RuntimeModel, is_exported, load_runtime_model

__all__ = ["ExportConfig", "Format", "QDQLinear", "QdqActivations", "Runtime", "RuntimeModel", "export_model",
           "is_exported", "load_runtime_model", "read_metadata"]

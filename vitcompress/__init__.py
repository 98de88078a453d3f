"""vitcompress: make a pretrained Vision Transformer smaller and faster, and measure what it cost."""

__version__ = "0.1.0"

from .artifact import load_artifact, save_artifact  # noqa: E402
from .errors import UserError  # noqa: E402
from .models import create_model, data_config, model_info  # noqa: E402
from .transforms import compress_, register_transform  # noqa: E402

__all__ = [
    "UserError", "__version__", "compress_", "create_model", "data_config", "load_artifact", "model_info",
    "register_transform", "save_artifact",
]

"""vitcompress: make a pretrained Vision Transformer smaller and faster, and measure what it cost."""

import os as _os

# Installed, kernels/ and recipes/ ship as vitcompress.kernels and vitcompress.recipes (pyproject's package-dir).
# Run from a source checkout that is not installed (e.g. `python -m benchmarks.kernels` on a machine
# whose Python has no registry access), the same names resolve to the folders beside this package.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and \
        _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)

from ._version import __version__  # noqa: E402
from .artifact import save_artifact  # noqa: E402
from .errors import UserError  # noqa: E402
from .kernels._triton import Backend  # noqa: E402
from .models import data_config, model_info  # noqa: E402
from .pipeline import Calibration, apply_stack, create_model, load_artifact, load_base  # noqa: E402
from .transforms import compress_, register_transform  # noqa: E402

__all__ = [
    "Backend", "Calibration", "UserError", "__version__", "apply_stack", "compress_", "create_model", "data_config",
    "load_artifact", "load_base", "model_info", "register_transform", "save_artifact",
]

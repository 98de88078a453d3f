"""vitcompress: make a pretrained Vision Transformer smaller and faster, and measure what it cost."""

import importlib as _importlib
import os as _os

# Installed, the checkout's recipes/ (where users' commands name them) ships as vitcompress.recipes (pyproject's
# package-dir). Run from a source checkout that is not installed (the GPU runbook on a device's own Python), the
# same name resolves to the folder beside this package.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "recipes")) and \
        _os.path.isfile(_os.path.join(_root, "recipes", "__init__.py")):
    __path__.append(_root)

from ._version import __version__  # noqa: E402

# The public names load on first use (PEP 562): `import vitcompress` and `vitcompress --help` stay light, and
# `import vitcompress.kernels` loads neither timm nor the pipeline.
_LAZY = {
    "save_artifact": ".artifact", "UserError": ".errors", "Backend": ".kernels._triton", "data_config": ".models",
    "model_info": ".models", "Calibration": ".pipeline", "apply_stack": ".pipeline", "create_model": ".pipeline",
    "load_artifact": ".pipeline", "load_base": ".pipeline", "compress_": ".transforms",
    "register_transform": ".transforms",
}

__all__ = [
    "Backend", "Calibration", "UserError", "__version__", "apply_stack", "compress_", "create_model", "data_config",
    "load_artifact", "load_base", "model_info", "register_transform", "save_artifact",
]


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    raise AttributeError(f"module 'vitcompress' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

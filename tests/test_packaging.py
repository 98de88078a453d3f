import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_ship_under_a_name_that_cannot_clash():
    mod = importlib.import_module("vitcompress.kernels")
    assert Path(mod.__file__).resolve().parent == ROOT / "kernels"
    import vitcompress  # noqa: F401

    top = sys.modules.get("kernels")
    assert top is None or Path(getattr(top, "__file__", "") or "").resolve().parent != ROOT / "kernels"


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vitcompress").rglob("__init__.py")}
    on_disk |= {f"vitcompress.{k}" for k in ("kernels", "recipes")}
    assert on_disk == listed
    assert cfg["package-dir"] == {"vitcompress.kernels": "kernels", "vitcompress.recipes": "recipes"}


def test_package_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    from vitcompress.kernels import triton_available

    assert triton_available() is False

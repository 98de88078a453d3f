import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_a_real_subpackage_that_loads_nothing_else():
    """vitcompress/kernels is an ordinary subpackage (no package-dir mapping, no name guard), and importing it loads
    neither timm nor the pipeline, in a fresh interpreter."""
    import subprocess

    mod = importlib.import_module("vitcompress.kernels")
    assert Path(mod.__file__).resolve().parent == ROOT / "vitcompress" / "kernels"
    assert not (ROOT / "kernels").exists()
    code = ("import sys, vitcompress.kernels; print(*sorted(m for m in sys.modules if m == 'timm' or "
            "m.startswith(('vitcompress.pipeline', 'vitcompress.transforms', 'vitcompress.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vitcompress").rglob("__init__.py")}
    on_disk |= {"vitcompress.recipes"}
    assert on_disk == listed
    assert cfg["package-dir"] == {"vitcompress.recipes": "recipes"}


def test_package_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    from vitcompress.kernels import triton_available

    assert triton_available() is False


def test_a_source_checkout_runs_without_install(tmp_path):
    """`python -m vitcompress...` from an uninstalled checkout finds its kernels and recipes/ under vitcompress.*
    (how the GPU machine runs the benchmarks: its Python has no registry to install from)."""
    import shutil
    import subprocess

    for name in ("vitcompress", "recipes"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import vitcompress.kernels.attention as a, vitcompress.recipes as r; print(a.__file__, *r.__path__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels, recipes = out.stdout.split()
    assert Path(kernels).parent == tmp_path / "vitcompress" / "kernels" and Path(recipes) == tmp_path / "recipes"

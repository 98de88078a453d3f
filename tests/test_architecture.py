"""ARCHITECTURE.md's layer order, enforced here (not only by ../shared/tools): every import of a vitcompress module goes
down the page, and kernels/ imports nothing from vitcompress."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ARCHITECTURE.md's layers, top to bottom; a module may import from its own layer and the ones above it
LAYERS = [
    ["errors", "config", "device", "io", "provenance", "ui", "_version", "distributed", "kernels", "recipes"],
    ["data"],
    ["models"],
    ["artifact"],
    ["bench", "training"],
    ["transforms"],
    ["export"],
    ["pipeline"],
    ["robustness", "evaluate", "probe", "train", "dropins"],
    ["goals", "report", "sweep", "demo", "cli_output"],
    ["search"],
    ["cli_common", "cli_tokens", "cli_info", "cli", "entry", "__main__", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "vitcompress", "vitcompress"),):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _top(module: str) -> str:
    """The ARCHITECTURE entry of a vitcompress module: its first component below the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """vitcompress modules imported at module level (not inside functions) by ``module``, with line numbers."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(t, line) for t, line in found if t == "vitcompress" or t.startswith("vitcompress.")]


MODULES = _modules()


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in MODULES} - set(LAYER))
    assert not missing, f"add these to ARCHITECTURE.md and LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module):
    path = MODULES[module]
    src = _top(module)
    for target, line in _imports(module, path):
        if module.startswith("vitcompress.kernels"):
            assert target.startswith("vitcompress.kernels"), f"{path.name}:{line}: kernels/ imports {target}"
            continue
        dst = _top(target)
        if dst == "__init__" or module.endswith("__init__") or src == "__init__":
            continue  # the package's own __init__ re-exports the public API
        assert LAYER[dst] <= LAYER[src], (f"{path.relative_to(ROOT)}:{line}: {src} (layer {LAYER[src]}) imports "
                                          f"{target} (layer {LAYER[dst]}), which sits below it in ARCHITECTURE.md")

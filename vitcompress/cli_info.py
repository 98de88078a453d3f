"""The commands that describe rather than compress: ``info`` (what an artifact or an exported file holds) and
``list`` (every method, its family, whether it deploys, and the command that applies it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .artifact import WEIGHTS, is_artifact, read_manifest, read_weights
from .cli_common import app
from .cli_output import print_table
from .errors import ModelError, UserError
from .export import is_exported
from .export.onnx import read_metadata
from .transforms import registered

# transform name -> (the command that applies it, an example of its strength); a config that needs a strength to
# exist (token_merge, adaptive_tokens) is built from the example to say whether it deploys
COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "token_merge": ("merge --r 8 | --keep-rate 0.7 | --target-flops 0.65", {"r": 8}),
    "adaptive_tokens": ("adapt --target-flops 0.65", {"target_flops": 0.65}),
    "learned_merge": ("learn-merge --target-flops 0.65", {}),
    "resolution": ("(sweep stacks: {name: resolution, img_size: N})", {}),
    "sparse_attention": ("sparse-attn --density 0.5", {}),
    "eventful": ("eventful --fraction 0.3", {}),
    "quantize": ("quantize [--mode deploy] --w-bits 8 --a-bits 8", {}),
    "mixed_precision": ("quantize --mean-bits 5", {}),
    "prune": ("prune --heads 0.25 --mlp 0.5", {}),
    "block_sparse": ("prune --sparsity 0.5", {}),
    "minivit": ("prune --share 2", {}),
    "recovery": ("prune ... --epochs N (distillation after the stack)", {}),
}


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@app.command("list")
def list_methods() -> None:
    """Every method: its family, whether it runs deployed (not only simulated), and the command that applies it."""
    rows: dict[str, Any] = {}
    for name, cls in sorted(registered().items(), key=lambda kv: (getattr(kv[1], "FAMILY", ""), kv[0])):
        command, example = COMMANDS.get(name, ("(sweep stacks)", {}))
        try:
            deploys = "deploys" if cls(**example).deployable else "simulated (accuracy study); --mode deploy runs"
        except UserError:
            deploys = "?"
        rows[f"{name} ({getattr(cls, 'FAMILY', '-')})"] = f"{deploys}; vitcompress {command}"
    print_table("methods", rows)


@app.command()
def info(path: Path = typer.Argument(..., help="An artifact folder or an exported .onnx / .pt2 file.")) -> None:
    """What an artifact or an exported file holds: the base, each transform with its config and solved state, size,
    recorded metrics, provenance and whether its weights match their recorded checksum."""
    if is_exported(path):
        meta = read_metadata(path)
        rows: dict[str, Any] = {"exported file": str(path), "size MiB": round(path.stat().st_size / 2**20, 2)}
        rows.update({k: _short(v) for k, v in meta.items()})
        print_table("info", rows)
        return
    if not is_artifact(path):
        raise ModelError(f"{path} is neither a vitcompress artifact (no vitcompress.json) nor an exported model")
    manifest = read_manifest(path)
    try:
        read_weights(path, verify=True)
        checksum = "ok (SHA-256 matches vitcompress.json)"
    except UserError as exc:
        checksum = f"MISMATCH: {exc}"
    model = manifest["model"]
    rows = {"artifact": str(path), "model": f"{model['arch']} {_short(model.get('kwargs') or {})}",
            "base": _short(manifest.get("base")), "weights": checksum,
            "size MiB": round(manifest["files"][WEIGHTS]["bytes"] / 2**20, 2)}
    for i, t in enumerate(manifest.get("transforms") or []):
        rows[f"{i + 1}. {t['name']} v{t.get('version')}"] = _short(t.get("config"), 160)
        rows[f"{i + 1}. {t['name']} state"] = _short(t.get("state"), 160)
    for k, v in (manifest.get("metrics") or {}).items():
        rows[f"metric {k}"] = _short(v)
    prov = manifest.get("provenance") or {}
    if prov.get("random_weights"):
        rows["RANDOM WEIGHTS"] = "built with --random-weights: for speed studies only"
    for k in ("saved", "versions", "calibration", "data"):
        if k in prov:
            rows[f"provenance {k}"] = _short(prov[k])
    print_table("info", rows)

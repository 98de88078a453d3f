"""``vitcompress demo``: the main job.

Trains the digits testbed (or reuses it from the cache when the recipe is unchanged), then runs the
bundled ``recipes/demo.yaml`` sweep: token reduction, quantization and pruning alone and stacked, with
accuracy on digits / digits-c and latency on this machine, and writes the Pareto report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .io import atomic_write_json, atomic_write_text

DEFAULT_RECIPE = "digits_vit"
DEFAULT_SWEEP = "demo"
DEFAULT_OUT = "vitcompress-demo"


def cache_dir() -> Path:
    """``$VITCOMPRESS_CACHE`` or ``~/.cache/vitcompress``."""
    return Path(os.environ.get("VITCOMPRESS_CACHE") or Path.home() / ".cache" / "vitcompress")


def baseline(recipe: str = DEFAULT_RECIPE, *, progress: bool = False, log=print) -> Path:
    """Path of the trained testbed artifact for ``recipe``; trains it on a cache miss."""
    from .artifact import is_artifact, read_manifest
    from .recipes import recipe_path
    from .train import TrainConfig, load_recipe, train

    data = load_recipe(recipe_path(recipe))
    cfg = TrainConfig.from_dict(data.get("train", data))
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"{Path(str(recipe)).stem}-{key}"
    if is_artifact(out):
        try:
            read_manifest(out)
            log(f"reusing trained baseline {out}")
            return out
        except Exception:
            pass
    log(f"training baseline from {recipe} -> {out}")
    train(cfg, out, progress=progress, recipe=data)
    return out


def run_demo(out: str | Path = DEFAULT_OUT, *, recipe: str = DEFAULT_SWEEP, progress: bool = False,
             log=print) -> Path:
    """Train-or-reuse the testbed, run the demo sweep (every method alone and stacked), write the report.

    Returns the sweep directory (``report.md``, ``pareto.png``, ``points.csv``, ``pareto.json``, ``points/``).
    """
    from .sweep import run_sweep

    run_sweep(recipe, out, progress=progress, log=log)
    log(f"wrote {Path(out) / 'report.md'} and {Path(out) / 'pareto.png'}")
    return Path(out)


def evaluate_testbed(artifact: str | Path, out: str | Path, *, progress: bool = False, title: str = "vitcompress demo",
                     name: str | None = None, extra: str = "") -> dict[str, Any]:
    """Evaluate a testbed artifact on digits and digits-c; write ``baseline_<spec>.json`` and ``report.md``."""
    from .bench import BenchConfig
    from .data import load_data
    from .evaluate import evaluate
    from .models import create_model, data_config, model_info

    out = Path(out)
    model = create_model(str(artifact))
    results = {}
    for spec in ("digits", "digits-c"):
        data = load_data(spec, data_config(model))
        results[spec] = evaluate(model, data, bench=BenchConfig(batch_sizes=(1, 64)), progress=progress)
        atomic_write_json(out / f"baseline_{spec}.json", results[spec])
    report = _report(title, name or str(artifact), results, model_info(model).metrics)
    atomic_write_text(out / "report.md", report + extra)
    return results


def _report(title: str, base: str, results: dict[str, dict[str, Any]], train_metrics: dict[str, Any]) -> str:
    clean, corrupt = results["digits"], results["digits-c"]
    lines = [
        f"# {title}", "",
        f"Baseline: `{base}` ({clean['model']['arch']}, {clean['params']:,} params, "
        f"{clean['gflops']:.3f} GFLOPs/image, {clean['size_mb']:.2f} MiB), trained for "
        f"{train_metrics.get('epochs', '?')} epochs in {train_metrics.get('train_seconds', '?')} s "
        f"(training loop, {train_metrics.get('device', '?')}).",
        f"Device: {clean['device']}; dtype {clean['dtype']}; torch {clean['versions']['torch']}, "
        f"timm {clean['versions']['timm']}; {clean['date']}.", "",
        "| data | images | top-1 % | agreement % | latency b1 ms | latency b64 ms | img/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, r in results.items():
        lat = r.get("latency_ms", {})
        lines.append(f"| {spec} | {r['n_images']} | {r['top1']:.2f} | {r['agreement']:.2f} | "
                     f"{lat.get('1', {}).get('median', float('nan')):.2f} | "
                     f"{lat.get('64', {}).get('median', float('nan')):.2f} | {r['throughput']:.0f} |")
    if "groups" in corrupt:
        lines += ["", "digits-c per corruption:", "", "| corruption | images | top-1 % |", "|---|---:|---:|"]
        lines += [f"| {g} | {m['n_images']} | {m['top1']:.2f} |" for g, m in corrupt["groups"].items()]
    lines.append("")
    return "\n".join(lines)

"""Reproduce the foundation's testbed figures: ``python -m benchmarks.testbed --out results/foundation``.

Times the full ``vitcompress train --recipe digits_vit`` command in a fresh process (wall clock, start-up
and final evaluation included), then evaluates the artifact on digits and digits-c and writes
``train.json``, ``baseline_digits.json``, ``baseline_digits-c.json`` and ``report.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vitcompress import create_model, data_config, model_info
from vitcompress.bench import BenchConfig
from vitcompress.data import load_data
from vitcompress.evaluate import evaluate
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.provenance import versions
from vitcompress.report import markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--recipe", default="digits_vit")
    parser.add_argument("--artifact", type=Path, default=None, help="where to train (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or Path(tmp) / "digits_vit"
        cmd = [sys.executable, "-m", "vitcompress", "train", "--recipe", args.recipe, "--out", str(artifact)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results = evaluate_testbed(artifact, args.out, title="Foundation: the digits testbed",
                                   name=f"recipe {args.recipe}", extra=(
            f"\nThe `vitcompress train --recipe {args.recipe}` command took {wall:.1f} s wall clock in a fresh "
            "process (start-up, data preparation, training and the final test-split evaluation).\n"))
        atomic_write_json(args.out / "train.json", {
            "command": " ".join(["vitcompress", *cmd[3:]]), "wall_seconds": round(wall, 1),
            "top1_digits_test": results["digits"]["top1"], "top1_digits_c": results["digits-c"]["top1"],
            "device": results["digits"]["device"], "versions": versions(), "date": results["digits"]["date"],
        })
    print(f"train: {wall:.1f} s wall; digits top1 {results['digits']['top1']:.2f}; "
          f"digits-c top1 {results['digits-c']['top1']:.2f}; wrote {args.out}")
    return 0


def evaluate_testbed(artifact: str | Path, out: str | Path, *, progress: bool = False, title: str = "vitcompress demo",
                     name: str | None = None, extra: str = "") -> dict[str, Any]:
    """Evaluate a testbed artifact on digits and digits-c; write ``baseline_<spec>.json`` and ``report.md``."""
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
        markdown_table(["data", "images", "top-1 %", "agreement %", "latency b1 ms", "latency b64 ms", "img/s"],
                       [[spec, r["n_images"], r["top1"], r["agreement"],
                         r.get("latency_ms", {}).get("1", {}).get("median"),
                         r.get("latency_ms", {}).get("64", {}).get("median"), f"{r['throughput']:.0f}"]
                        for spec, r in results.items()]),
    ]
    if "groups" in corrupt:
        lines += ["", "digits-c per corruption:", "",
                  markdown_table(["corruption", "images", "top-1 %"],
                                 [[g, m["n_images"], m["top1"]] for g, m in corrupt["groups"].items()])]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

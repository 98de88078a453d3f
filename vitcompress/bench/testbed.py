"""Reproduce the foundation's testbed figures: ``python -m vitcompress.bench.testbed --out results/foundation``.

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

from ..io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--recipe", default="digits_vit")
    parser.add_argument("--artifact", type=Path, default=None, help="where to train (default: a temp dir)")
    args = parser.parse_args(argv)

    from ..demo import evaluate_testbed
    from ..provenance import versions

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


if __name__ == "__main__":
    sys.exit(main())

"""Choose mixed precision's candidate widths on held-out train data (issue #21), beside uniform W5A5.

    python -m benchmarks.cifar10_mixed --data ../shared/data/cifar10 --out results/quant/cifar10_mixed

Every row is one stack on the CIFAR-10 testbed at a mean of 5 bits (mse observer), calibrated on the train images
the low-bit sweep calibrates on, and scored on 5,000 *other* train images, clean and corrupted. The chosen candidate
set (best held-out top-1, then agreement) is what `recipes/cifar10_lowbit.yaml` then runs on the test set.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

from vitcompress import Calibration, apply_stack, create_model, data_config
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results

from .holdout import FP32_CPU, holdout_sets, reference_logits, score

TESTBED = "results/cifar10/testbed"
CALIB, MIXED_CALIB = 256, 64  # the sweep's calibration images, and mixed precision's own calib_size default
UNIFORM = {"W5A5 mse (uniform)": [{"name": "quantize", "w_bits": 5, "a_bits": 5, "observer": "mse", "calib_size": 256}]}
CANDIDATES = {f"mixed {'/'.join(map(str, c))}, mean 5": c
              for c in ([4, 6, 8], [4, 5, 6], [4, 5, 6, 8], [4, 5, 6, 7, 8])}


def stacks() -> dict[str, list[dict[str, Any]]]:
    return {**UNIFORM, **{name: [{"name": "mixed_precision", "mean_bits": 5.0, "candidates": c,
                                  "quant": {"observer": "mse"}}] for name, c in CANDIDATES.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    base = create_model(TESTBED)
    held = holdout_sets(args.data, data_config(base), (CALIB, MIXED_CALIB))
    refs = reference_logits(base, held)
    rows = []
    for name, stack in stacks().items():
        t0 = time.perf_counter()
        model = apply_stack(copy.deepcopy(base), stack, calib=Calibration(args.data, CALIB))
        row: dict[str, Any] = {"stack": name, "config": stack[0], "seconds": round(time.perf_counter() - t0, 1),
                               **score(model, held, refs)}
        if stack[0]["name"] == "mixed_precision":
            row["mean_bits"] = model.vitcompress_info.transforms[-1]["state"]["mean_bits"]
        rows.append(row)
        print(row, flush=True)
    mixed = [r for r in rows if "mean_bits" in r]
    best = max(mixed, key=lambda r: (r["holdout_top1"], r["holdout_agreement"]))
    res = {"command": f"python -m benchmarks.cifar10_mixed --data {args.data} --out {args.out}", "rows": rows,
           "chosen": best["stack"], "chosen_step": best["config"], "dtype": "fp32",
           **run_context(FP32_CPU.resolve_device())}
    cols = ["holdout_top1", "holdout_agreement", "holdout-c_top1", "holdout-c_agreement"]
    md = "\n".join([
        "# Mixed precision at a mean of 5 bits: the candidate widths chosen on held-out train data", "",
        f"{res['device']}; fp32; torch {res['versions']['torch']}; {res['date']}. Reproduce: `{res['command']}`.", "",
        f"The CIFAR-10 testbed; calibration on the sweep's {CALIB} train images (mixed precision's sensitivities on "
        f"{MIXED_CALIB}); scored on 5,000 other train images, clean and with cifar10-c's corruptions. The testbed "
        "trained on every train image, so these figures rank, they do not estimate test accuracy.", "",
        markdown_table(["stack", "mean bits", *cols, "s"],
                       [[r["stack"], r.get("mean_bits", 5.0), *(r[c] for c in cols), r["seconds"]] for r in rows]),
        "", f"**Chosen: {res['chosen']}** (`{res['chosen_step']}`); run on the test set by "
        "`recipes/cifar10_lowbit.yaml`.", ""])
    write_results(args.out, "mixed_holdout", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

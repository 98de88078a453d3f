"""Without VNNI, which side of the int8 GEMM takes 7 bits: chosen on held-out CIFAR-10 train images (issue #17).

Run under an AVX2 cap (``bash benchmarks/cpu_avx2.sh OUT mode``): oneDNN's u8 x s8 GEMM then sums adjacent products
in saturating int16, and the W8A8 layer keeps them exact either with 7-bit activation codes (``acts``) or with its
int8 weights halved onto 7 bits (``weights``). Each is scored by the agreement of the CIFAR-10 testbed's W8A8 deploy
(static per tensor and per token) with the float testbed on 5,000 held-out train images, clean and corrupted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from vitcompress import Calibration, apply_stack, create_model, data_config
from vitcompress.io import atomic_write_json
from vitcompress.provenance import run_context
from vitcompress.transforms.quantize import int8_linear

from .holdout import FP32_CPU, holdout_sets, reference_logits, score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if int8_linear.ONEDNN_EXACT:
        print("error: oneDNN's int8 GEMM is exact here: run under ONEDNN_MAX_CPU_ISA=AVX2", file=sys.stderr)
        return 2
    base = create_model("results/cifar10/testbed")
    held = holdout_sets(args.data, data_config(base), 256)
    refs = reference_logits(base, held)
    rows = {}
    for gran in ("per_tensor", "per_token"):
        model = apply_stack(copy.deepcopy(base), [{"name": "quantize", "mode": "deploy", "a_granularity": gran,
                                                   "calib_size": 256}], calib=Calibration(args.data, 256))
        for mode in ("acts", "weights"):
            int8_linear.NO_VNNI = mode
            int8_linear._PACKED.clear()  # repack: the weights' codes depend on the mode
            scores = score(model, held, refs)
            for k in held:
                rows[f"{mode} {gran} {k}"] = scores[f"{k}_agreement"]
                print(mode, gran, k, rows[f"{mode} {gran} {k}"], flush=True)
    means = {mode: sum(v for k, v in rows.items() if k.startswith(mode)) / 4 for mode in ("acts", "weights")}
    res = {"agreement": rows, "mean_agreement": means, "chosen": max(means, key=means.get),
           **run_context(FP32_CPU.resolve_device())}
    atomic_write_json(args.out / "int8_no_vnni_mode.json", res)
    print("chosen:", res["chosen"], means)
    return 0


if __name__ == "__main__":
    sys.exit(main())

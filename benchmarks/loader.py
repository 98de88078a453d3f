"""Data loading vs model speed: ``python -m benchmarks.loader --out results/scale``.

Writes a JPEG ImageFolder and a memory-mapped HF arrow dataset (``save_to_disk``) of ``--images`` digits
rendered at 256 px, then measures images/s of the loader alone (decode + timm eval transform + batching)
with 0..``--max-workers`` worker processes, against the model's bf16 throughput (vit_small_patch16_224,
batch 64) on the same machine. Also times a 1- vs 2-process ``torchrun`` eval (``--torchrun``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from vitcompress import create_model, data_config
from vitcompress.bench import BenchConfig, time_model
from vitcompress.data import load_data
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table


def write_sources(root: Path, n: int) -> dict[str, Path]:
    """An ImageFolder of JPEGs and an HF arrow dataset holding the same ``n`` images (256 px)."""
    import datasets

    digits = load_digits()
    folder = root / "folder" / "val"
    images, labels = [], []
    for i in range(n):
        k = i % len(digits.images)
        arr = (digits.images[k] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((256, 256), Image.BILINEAR).convert("RGB")
        (folder / str(digits.target[k])).mkdir(parents=True, exist_ok=True)
        img.save(folder / str(digits.target[k]) / f"{i:06d}.jpg", quality=90)
        images.append(img)
        labels.append(int(digits.target[k]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"image": images, "label": labels},
                                                                    features=features)}
                         ).save_to_disk(str(root / "arrow"))
    return {"imagefolder (JPEG)": root / "folder", "HF arrow (memory-mapped)": root / "arrow"}


def loader_throughput(spec: str, data_cfg: dict[str, Any], workers: int, batch: int = 64) -> float:
    """Images/s of iterating the whole dataset once (after one warm-up batch)."""

    data = load_data(spec, data_cfg)
    it = iter(data.loader(batch, workers=workers))
    next(it)
    t0, n = time.perf_counter(), 0
    for x, _, _ in it:
        n += len(x)
    return n / (time.perf_counter() - t0)


def torchrun_wall(spec: str, nproc: int, limit: int) -> float:
    """Wall seconds of ``vitcompress eval`` (accuracy pass only) under torchrun with ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "vitcompress", "eval", "vit_small_patch16_224", "--random-weights", "--num-classes", "10", "--data", spec,
           "--limit", str(limit), "--no-speed", "--reference", "none"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--torchrun", action="store_true")
    args = parser.parse_args(argv)

    model = create_model("vit_small_patch16_224", num_classes=10)
    dcfg = data_config(model)
    model_ips = time_model(model, dcfg["input_size"], BenchConfig(repeat=5), (64,))["64"]["throughput"]
    print(f"model vit_small_patch16_224 bf16 b64: {model_ips:.0f} img/s", flush=True)
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_sources(Path(tmp), args.images)
        for name, path in sources.items():
            for w in range(args.max_workers + 1):
                ips = loader_throughput(str(path), dcfg, w)
                rows.append({"source": name, "workers": w, "images_per_s": round(ips, 1),
                             "model_images_per_s": round(model_ips, 1), "loader_over_model": round(ips / model_ips, 2)})
                print(f"{name}, {w} workers: {ips:.0f} img/s", flush=True)
        if args.torchrun:
            for nproc in (1, 2):
                wall = torchrun_wall(str(sources["HF arrow (memory-mapped)"]), nproc, args.images)
                runs.append({"nproc": nproc, "wall_s": round(wall, 2)})
                print(f"torchrun eval, {nproc} process(es): {wall:.1f} s", flush=True)
    res = {**run_context(BenchConfig().resolve_device()), "images": args.images, "rows": rows, "torchrun": runs}
    atomic_write_json(args.out / "loader.json", res)
    lines = ["# Data loading vs model throughput", "",
             f"Device: {res['device']}; torch {res['versions']['torch']}; {res['date']}. {args.images} digits "
             "rendered at 256 px; timm eval transform to 224 px; batch 64. Model: vit_small_patch16_224, bf16 "
             "autocast + SDPA, batch 64.", "",
             markdown_table(["source", "workers", "loader img/s", "model img/s", "loader / model"],
                            [[r["source"], r["workers"], f"{r['images_per_s']:.0f}", f"{r['model_images_per_s']:.0f}",
                              r["loader_over_model"]] for r in rows])]
    if runs:
        lines += ["", f"`torchrun --nproc-per-node N -m vitcompress eval vit_small_patch16_224 --data ARROW "
                  f"--limit {args.images} --no-speed` wall time (process start-up included):", "",
                  markdown_table(["processes", "wall s"], [[r["nproc"], r["wall_s"]] for r in runs], align="rr")]
    atomic_write_text(args.out / "loader.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

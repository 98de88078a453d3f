"""Choose the CIFAR-10 testbed recipe on a GPU, on held-out train data, at the CPU's compute budget.

The testbed must train on the 2-core CPU in <= 100 minutes, so one CPU run per recipe is all a session can
afford. A lent GPU trains several candidates at once, each with the project's own training loop (``fit``:
AdamW, warmup + cosine, the recipe's augmentation), in fp32, on 45,000 train images, and scores them on the
other 5,000 (a seeded split of the *train* set: the test set chooses nothing). Each candidate's epochs are set
so that its CPU cost matches the budget (``--budget``: epochs of the current recipe's model).

    python -m benchmarks.cifar10_recipes pack --data ../shared/data/cifar10 --out .cifar10_pack.pt
    python -m benchmarks.cifar10_recipes search --pack .cifar10_pack.pt --out results/cifar10/recipe_search

``pack`` stores the JPEG bytes as tensors (no pyarrow needed where the search runs); ``search`` writes
``search.json`` / ``search.md``; each candidate's test top-1 is recorded for information only.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vitcompress.bench import BenchConfig
from vitcompress.data.base import ImageData, TensorImages
from vitcompress.evaluate import accuracy_metrics, predict
from vitcompress.models import build_model
from vitcompress.report import markdown_table
from vitcompress.train import recipe_config
from vitcompress.training import fit

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10_vit.yaml"
HOLDOUT = 5000

# name -> (model_kwargs overrides, train overrides, CPU cost of one epoch relative to the recipe's model)
# Relative cost: per token and layer, the linear layers cost (4 + 2 * mlp_ratio) * width^2; the recipe's model
# is width 128, depth 6, mlp_ratio 2 -> 8 * 128^2 * 6.
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "recipe": ({}, {}),
    "lr 3e-3": ({}, {"lr": 0.003}),
    "lr 8e-4": ({}, {"lr": 0.0008}),
    "no label smoothing": ({}, {"label_smoothing": 0.0}),
    "batch 64": ({}, {"batch_size": 64, "lr": 0.001}),
    "depth 8": ({"depth": 8}, {}),
    "width 192 depth 4": ({"embed_dim": 192, "depth": 4, "num_heads": 6}, {}),
    "mlp 4 depth 4": ({"mlp_ratio": 4.0, "depth": 4}, {}),
}


def relative_cost(kw: dict[str, Any]) -> float:
    w, d, r = kw["embed_dim"], kw["depth"], kw["mlp_ratio"]
    return (4 + 2 * r) * w * w * d / ((4 + 2 * 2.0) * 128 * 128 * 6)


def pack(data: str, out: Path) -> None:
    """The JPEG bytes and labels of both splits as uint8/int64 tensors (``torch.load(weights_only=True)``)."""
    import pyarrow.parquet as pq

    res: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        t = pq.read_table(sorted(Path(data).glob(f"**/{split}*.parquet")))
        col = t.column("image").combine_chunks().field("bytes").to_pylist()
        lens = torch.tensor([len(b) for b in col])
        res[f"{split}_bytes"] = torch.frombuffer(bytearray(b"".join(col)), dtype=torch.uint8)
        res[f"{split}_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        res[f"{split}_labels"] = torch.tensor(t.column("label").to_pylist())
    torch.save(res, out)


def _decode(args: tuple[bytes, ...]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in args])


def unpack(path: Path, split: str, workers: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """([N,3,32,32] uint8, [N] int64) of one split."""
    d = torch.load(path, weights_only=True)
    raw, off = d[f"{split}_bytes"].numpy().tobytes(), d[f"{split}_offsets"].tolist()
    blobs = [raw[a:b] for a, b in zip(off[:-1], off[1:])]
    chunks = [tuple(blobs[i:i + 2000]) for i in range(0, len(blobs), 2000)]
    with mp.get_context("spawn").Pool(workers) as pool:
        imgs = np.concatenate(pool.map(_decode, chunks))
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), d[f"{split}_labels"]


def _run(name: str, pack_path: str, device: str, budget: float, out: str, threads: int, limit: int) -> None:
    torch.set_num_threads(threads)

    doc = yaml.safe_load(RECIPE.read_text())
    kw_over, train_over = CANDIDATES[name]
    doc["train"]["model_kwargs"].update(kw_over)
    cost = relative_cost(doc["train"]["model_kwargs"])
    epochs = max(1, round(budget / cost))
    cfg = recipe_config(doc, **train_over, epochs=epochs, device=device, dtype="fp32")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_kwargs).to(device)
    x, y = unpack(Path(pack_path), "train", workers=threads)
    xt, yt = unpack(Path(pack_path), "test", workers=threads)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)

    def norm(u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255 - mean) / std

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    held, tr = perm[:HOLDOUT], perm[HOLDOUT:][:limit or None]
    def wrap(xs: torch.Tensor, ys: torch.Tensor, split: str) -> ImageData:
        return ImageData(TensorImages(norm(xs), ys), name="cifar10", split=split, has_labels=True, num_classes=10)

    loader = wrap(x[tr], y[tr], "train").loader(cfg.batch_size, shuffle=True, seed=cfg.seed)
    model.train()
    t0 = time.perf_counter()
    loss, _ = fit(model, loader, lambda a, b: torch.nn.functional.cross_entropy(
        model(a).float(), b, label_smoothing=cfg.label_smoothing), cfg, torch.device(device), desc=name)
    train_s = time.perf_counter() - t0
    model.eval()
    bench = BenchConfig(device=device, dtype="fp32")
    res: dict[str, Any] = {"name": name, "model_kwargs": cfg.model_kwargs, "overrides": train_over,
                           "epochs": epochs, "relative_cpu_cost": round(cost * epochs, 2),
                           "gpu_train_s": round(train_s, 1), "final_loss": round(loss, 4)}
    for key, (xs, ys) in {"holdout": (x[held], y[held]), "test": (xt, yt)}.items():
        logits, labels, _ = predict(model, wrap(xs, ys, key), cfg=bench, batch_size=500)
        res[f"{key}_top1"] = accuracy_metrics(logits, labels, None)["top1"]
    Path(out, f"{name.replace(' ', '_')}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


def search(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.candidates.split(",") if n] if args.candidates else list(CANDIDATES)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(n, args.pack, args.device, args.budget, str(out), args.threads,
                                                 args.limit))
             for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if f.name != "search.json"]
    rows.sort(key=lambda r: -r["holdout_top1"])
    (out / "search.json").write_text(json.dumps({"budget_epochs": args.budget, "holdout": HOLDOUT,
                                                  "device": torch.cuda.get_device_name() if args.device == "cuda"
                                                  else args.device, "torch": torch.__version__,
                                                  "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    table = markdown_table(["candidate", "epochs", "CPU cost (recipe epochs)", "held-out top-1", "test top-1 (info)",
                            "GPU s"], [[r["name"], r["epochs"], r["relative_cpu_cost"], r["holdout_top1"],
                                        r["test_top1"], r["gpu_train_s"]] for r in rows], align="llllll")
    (out / "search.md").write_text(table + "\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data", default="../shared/data/cifar10")
    a.add_argument("--out", default=".cifar10_pack.pt")
    s = sub.add_parser("search")
    s.add_argument("--pack", default=".cifar10_pack.pt")
    s.add_argument("--out", default="results/cifar10/recipe_search")
    s.add_argument("--device", default="cuda")
    s.add_argument("--budget", type=float, default=25.0, help="epochs of the recipe's model")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--limit", type=int, default=0, help="train images (0: all 45,000; a smoke test)")
    s.add_argument("--candidates", default="", help="comma-separated names (default: all)")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.data, Path(args.out))
        return 0
    return search(args)


if __name__ == "__main__":
    sys.exit(main())

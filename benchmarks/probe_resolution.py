"""Is a weak linear probe the backbone's or the resampled position embeddings'? The same probe (standardised features,
logistic regression) at 224 px (position embeddings resampled from 518 by timm) and at the native 518 px.

    python -m benchmarks.probe_resolution --checkpoint ../shared/models/dinov2_vits14/backbone.safetensors \\
        --data ../shared/data/cifar10 --train 400 --test 200 --out results/dinov2s

518 px costs about 7x the time of 224 px per image on a CPU (1,370 tokens against 257), hence the small sample.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vitcompress.data import load_data
from vitcompress.models import build_model, data_config
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results


def features(model: torch.nn.Module, spec: str, n: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features [n,D] and labels [n] of n evenly spaced images."""
    data = load_data(spec, data_config(model), limit=n, purpose=purpose)
    feats, labels = [], []
    with torch.inference_mode():
        for x, y, _ in data.loader(25):
            feats.append(model(x))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--sizes", default="224,518")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        model = build_model("vit_small_patch14_dinov2", checkpoint=args.checkpoint, img_size=size, num_classes=0)
        t0 = time.perf_counter()
        xtr, ytr = features(model, args.data, args.train, "train")
        xte, yte = features(model, args.data, args.test, "eval")
        seconds = time.perf_counter() - t0
        scaler = StandardScaler().fit(xtr.numpy())
        for c in (0.01, 0.1, 1.0):
            clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(xtr.numpy()), ytr.numpy())
            acc = float((clf.predict(scaler.transform(xte.numpy())) == yte.numpy()).mean()) * 100
            rows.append({"img_size": size, "C": c, "top1_%": round(acc, 2), "feature_seconds": round(seconds)})
            print(rows[-1], flush=True)
    res = {**run_context(torch.device("cpu")), "args": vars(args), "rows": rows}
    md = ["# The linear probe at 224 px (resampled position embeddings) and at the native 518 px", "",
          f"{args.train} train / {args.test} test images, evenly spaced. `python -m benchmarks.probe_resolution "
          f"--checkpoint ... --data ... --train {args.train} --test {args.test}` ({res['date']}).", "",
          markdown_table(list(rows[0]), [list(r.values()) for r in rows])]
    write_results(args.out, "probe_resolution", res, "\n".join(md))


if __name__ == "__main__":
    main()

"""Eventful Transformers on synthetic video: GFLOPs and CPU latency per frame, and per-clip accuracy, against the
per-frame model, with ToMe at equal GFLOPs beside it.

    python -m benchmarks.eventful --model results/cifar10/testbed --data ../shared/data/cifar10 --out results/eventful

The clips are synthetic (``video:`` data, :mod:`vitcompress.data.video`): CIFAR-10 objects moving over static
and panning CIFAR-10 backgrounds, 16 frames each. The operating point is chosen on clips made from held-out
*train* images (``video:N:heldout:2000:DATA``); the test clips (from the test split) are only reported.
Every model is built by :func:`vitcompress.pipeline.apply_stack`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitcompress.bench import BenchConfig, Dtype
from vitcompress.data import load_data
from vitcompress.evaluate import accuracy_metrics, forward, predict
from vitcompress.models import data_config
from vitcompress.pipeline import apply_stack, load_artifact
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results

POINTS: list[tuple[str, list[dict[str, Any]]]] = [
    *[(f"eventful top-k {f}", [{"name": "eventful", "policy": "topk", "fraction": f}]) for f in (0.7, 0.5, 0.4, 0.3)],
    *[(f"eventful threshold {h}", [{"name": "eventful", "policy": "threshold", "threshold": h}])
      for h in (1.0, 2.0, 3.0)],
]


def gflops_per_frame(model: torch.nn.Module, clips: torch.Tensor) -> float:
    """Counted FLOPs (torch's counter: what the matmuls really computed) of clips [B,T,3,H,W] per frame."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        forward(model, clips)
    return counter.get_total_flops() / clips.shape[0] / clips.shape[1] / 1e9


def stream(model: torch.nn.Module, clips: torch.Tensor) -> None:
    """Run clips [B,T,3,H,W] as a stream: frame after frame, each a batch of the B streams' frame t (a video
    arrives a frame at a time, so the per-frame model gets no batch of future frames either)."""
    if hasattr(model, "reset"):
        model.reset()
    for t in range(clips.shape[1]):
        model(clips[:, t])


def latency(models: dict[str, torch.nn.Module], clips: torch.Tensor, repeat: int) -> dict[str, float]:
    """Median ms per frame of each model streaming clips [B,T,3,H,W], timed alternately (one process, same load)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            for m in models.values():
                stream(m, clips)
        for _ in range(repeat):
            for k, m in models.items():
                t = time.perf_counter()
                stream(m, clips)
                times[k].append((time.perf_counter() - t) * 1e3 / clips.shape[1])
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="results/eventful")
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--report-only", action="store_true", help="rebuild OUT/eventful.md from OUT/eventful.json")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads((Path(args.out) / "eventful.json").read_text())
        write_results(args.out, "eventful", res, markdown(res))
        return
    torch.manual_seed(0)
    base = load_artifact(args.model).eval()
    dcfg = data_config(base)
    bench = BenchConfig(device="cpu", dtype=Dtype.FP32)
    sets = {"heldout": load_data(f"video:{args.clips}:heldout:2000:{args.data}", dcfg),
            "test": load_data(f"video:{args.clips}:{args.data}", dcfg)}
    ref = {k: predict(base, d, batch_size=16, cfg=bench) for k, d in sets.items()}
    probe = torch.stack([sets["test"].dataset[i][0] for i in range(8)])
    dense_gf = gflops_per_frame(base, probe)
    rows: list[dict[str, Any]] = []

    def measure(name: str, stack: list[dict[str, Any]], family: str) -> dict[str, Any]:
        model = apply_stack(copy.deepcopy(base), stack) if stack else base
        row: dict[str, Any] = {"point": name, "family": family, "stack": stack,
                               "gflops": round(gflops_per_frame(model, probe), 5)}
        row["gflops_x"] = round(row["gflops"] / dense_gf, 4)
        for k, d in sets.items():
            logits, labels, _ = predict(model, d, batch_size=16, cfg=bench)
            acc = accuracy_metrics(logits, labels, ref[k][0])
            row[f"{k}_top1"], row[f"{k}_agreement"] = round(acc["top1"], 2), round(acc["agreement"], 2)
        if hasattr(model, "eventful_stats"):
            row["reprocessed"] = {g: round(v, 4) for g, v in model.eventful_stats().fractions().items()}
        rows.append(row)
        print(row, flush=True)
        return {"row": row, "model": model}

    built = {"per-frame": measure("per-frame (dense)", [], "dense")}
    for name, stack in POINTS:
        built[name] = measure(name, stack, "eventful")
    for name, r in list(built.items()):  # ToMe at each Eventful point's GFLOPs, on every frame on its own
        if r["row"]["family"] == "eventful" and r["row"]["gflops_x"] < 0.95:
            target = r["row"]["gflops_x"]
            built[f"tome@{name}"] = measure(f"ToMe at {target:.2f}x GFLOPs",
                                            [{"name": "token_merge", "target_flops": target}], "tome")
    ref_top1 = built["per-frame"]["row"]["heldout_top1"]
    chosen = min((r["row"] for r in built.values() if r["row"]["family"] == "eventful"
                  and r["row"]["heldout_top1"] >= ref_top1 - 1.0), key=lambda r: r["gflops"], default=None)
    timed = {"per-frame": built["per-frame"]["model"]}
    if chosen is not None:
        timed[chosen["point"]] = built[chosen["point"]]["model"]
        tome = next((r for r in built.values() if r["row"]["family"] == "tome"
                     and r["row"]["point"].endswith(f"{chosen['gflops_x']:.2f}x GFLOPs")), None)
        if tome is not None:
            timed[tome["row"]["point"]] = tome["model"]
    speed = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        clips = torch.stack([sets["test"].dataset[i][0] for i in range(bs)])
        ms = latency(timed, clips, args.repeat)
        speed.append({"streams": bs, **{k: round(v, 3) for k, v in ms.items()},
                      **{f"{k} x per-frame": round(v / ms["per-frame"], 3) for k, v in ms.items() if k != "per-frame"}})
        print(speed[-1], flush=True)
    cmd = ("python -m benchmarks.eventful --model " + args.model + " --data DATA --out " + args.out +
           f" --clips {args.clips} --batch-sizes {args.batch_sizes} --repeat {args.repeat}")
    res = {"context": run_context(torch.device("cpu")), "command": cmd,
           "data": {k: d.describe() for k, d in sets.items()},
           "dense_gflops_per_frame": round(dense_gf, 5), "points": rows, "chosen": chosen, "latency": speed,
           "repeat": args.repeat, "clips": args.clips}
    write_results(args.out, "eventful", res, markdown(res))


def markdown(res: dict[str, Any]) -> str:
    """The report of a run's JSON (``--report-only`` rebuilds it from ``OUT/eventful.json``)."""
    rows, speed, chosen = res["points"], res["latency"], res["chosen"]
    head = ["point", "GFLOPs/frame", "x per-frame", "held-out top-1", "held-out agree", "test top-1", "test agree",
            "re-processed (qkv/proj/mlp)"]
    table = markdown_table(head, [[r["point"], f"{r['gflops']:.4f}", f"{r['gflops_x']:.3f}", r["heldout_top1"],
                                   r["heldout_agreement"], r["test_top1"], r["test_agreement"],
                                   "/".join(f"{v:.2f}" for v in r["reprocessed"].values()) if "reprocessed" in r
                                   else ""] for r in rows])
    lat = markdown_table(list(speed[0]), [list(s.values()) for s in speed]) if speed else ""
    ctx = res["context"]
    return (f"# Eventful Transformers on SYNTHETIC video clips ({res['clips']} clips x 16 frames)\n\n"
            f"{ctx.get('device', '')} {ctx.get('date', '')}; torch {ctx.get('versions', {}).get('torch', '')}.\n\n"
            "Per-frame model: the CIFAR-10 testbed (its objects here fill 3/4 of a frame over another image, so its "
            "top-1 is lower than on CIFAR-10). Per-clip top-1 = argmax of the mean logits over the clip's frames; "
            "agreement with the per-frame model. CPU, fp32. Chosen point: the fewest GFLOPs within 1 pt of the "
            f"per-frame model's held-out clip top-1: **{chosen['point'] if chosen else 'none'}**.\n\n{table}\n\n"
            f"Latency, ms per frame (median of {res['repeat']}; each model streams 16 frames, a frame of every "
            f"stream at a time; models timed alternately; batch = streams):\n\n{lat}\n\n"
            f"Reproduce: `{res['command']}`\n")


if __name__ == "__main__":
    main()

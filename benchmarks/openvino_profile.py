"""Where the time goes in OpenVINO: a dense model against compressed ones (ToMe, pruning, W8A8), layer by layer.

    python -m benchmarks.openvino_profile --out results/export/openvino_profile

Each point is built by the one pipeline (``apply_stack``) on the same random-weight model (weights do not change
speed), exported to ONNX (static batch) and compiled by OpenVINO with its per-node performance counters
(``PERF_COUNT``). The counters' ``real_time`` of every executed node is summed per inference and the median over
``--repeat`` inferences is reported, three ways:

- by the node type OpenVINO executes (FullyConnected, MatMul, Softmax, MVN, Eltwise, Gather, TopK, ...);
- by role: the Linear layers (with what OpenVINO fuses into them: bias, GELU, LayerScale), the attention (one
  fused kernel where OpenVINO's snippets take q.k^T, softmax and A.V together, else its matmuls and softmax),
  norms, elementwise, token merging's own ops (the matching's scores, sort / top-k, gathers and scatters), and
  data movement (reorders, transposes, reshapes);
- by block (``blocks.N`` in the node's name), so one merged block sits beside the same dense block.

The end-to-end latency is timed separately with the counters off (they add overhead). "x dense" is the dense
point's latency over the point's, at the same batch size.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vitcompress.export import ExportConfig, export_model
from vitcompress.pipeline import Calibration, apply_stack, create_model
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table, write_results

POINTS: dict[str, list[dict[str, Any]]] = {
    "dense": [],
    "ToMe 0.65x": [{"name": "token_merge", "target_flops": 0.65}],
    "heads 25 % + MLP 50 %": [{"name": "prune", "heads": 0.25, "mlp": 0.5}],
    "heads 25 % + MLP 50 % + ToMe 0.65x": [{"name": "prune", "heads": 0.25, "mlp": 0.5},
                                          {"name": "token_merge", "target_flops": 0.65}],
}
# OpenVINO's executed node types, grouped by what they do in a ViT
LINEAR = {"FullyConnected", "Convolution"}
MERGE = {"TopK", "Sort", "ScatterUpdate", "ScatterElementsUpdate", "ScatterNDUpdate", "GatherElements", "GatherND",
         "ArgMax", "ReduceMax", "ReduceSum", "ReduceL2", "CumSum", "Range", "NonZero", "OneHot", "Select",
         "Equal", "Greater", "Less", "Gather", "ShapeOf", "Broadcast"}
MOVE = {"Reorder", "Transpose", "Reshape", "Concatenation", "Concat", "Split", "StridedSlice", "Slice",
        "Squeeze", "Unsqueeze", "VariadicSplit", "Convert"}
BLOCK = re.compile(r"blocks[./_](\d+)")


def role(exec_type: str, node_type: str, name: str) -> str:
    """What a node does: linear, attention matmul, softmax, norm, elementwise, merge ops, data movement, other."""
    t = node_type
    # OpenVINO's snippets fuse q.k^T, softmax and A.V into one kernel, named after the attention's output transpose
    # (under /attn/ in timm's own attention; in the block itself where token merging computes it)
    if t == "Subgraph" and ("/attn/" in name or re.search(r"blocks\.\d+/Transpose_\d+$", name)):
        return "attention (fused)"
    if t in LINEAR or (t == "MatMul" and re.search(r"(qkv|proj|fc1|fc2|head)", name)):
        return "linear"
    if t == "MatMul":
        return "attention matmul"
    if t == "Softmax":
        return "softmax"
    if t in ("MVN", "NormalizeL2"):
        return "norm"
    if t in MERGE:  # inside a block but outside its sublayers: the merging glue (outside: CLS gather and the like)
        inside = block_of(name) != "outside" and not re.search(r"/(attn|mlp|norm\d?|ls\d)/", name)
        return "token merging ops" if inside else "data movement"
    if t in MOVE:
        return "data movement"
    if t in ("Eltwise", "Subgraph", "Multiply", "Add", "Gelu", "Divide", "Power", "Sqrt", "Erf"):
        return "elementwise"
    return "other"


def block_of(name: str) -> str:
    found = BLOCK.search(name)
    return found.group(1) if found else "outside"


def profile(path: Path, batch: np.ndarray, repeat: int) -> tuple[float, list[dict[str, Any]]]:
    """(median latency in ms with the counters off, per-node median real_time in ms with them on)."""
    import openvino as ov

    core = ov.Core()
    plain = core.compile_model(str(path), "CPU")
    req = plain.create_infer_request()
    for _ in range(3):
        req.infer([batch])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        req.infer([batch])
        times.append((time.perf_counter() - t0) * 1e3)
    counted = core.compile_model(str(path), "CPU", {"PERF_COUNT": "YES"})
    req = counted.create_infer_request()
    req.infer([batch])
    per_node: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for _ in range(repeat):
        req.infer([batch])
        for p in req.get_profiling_info():
            if p.status.name == "EXECUTED":
                per_node[(p.node_name, p.node_type, p.exec_type)].append(p.real_time.total_seconds() * 1e3)
    nodes = [{"name": n, "node_type": t, "exec_type": e, "ms": statistics.median(v)}
             for (n, t, e), v in per_node.items()]
    return statistics.median(times), nodes


def summarise(nodes: list[dict[str, Any]], key: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for n in nodes:
        out[n[key]] += n["ms"]
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a timm.create_model argument (repeatable; tests shrink the model with depth=2)")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated names of POINTS")
    ap.add_argument("--stack", action="append", default=[], metavar="NAME=YAML",
                    help="another point: a name and its stack as a YAML list (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    points = {n: POINTS[n] for n in args.points.split(",") if n}
    for item in args.stack:
        name, _, text = item.partition("=")
        points[name] = yaml.safe_load(text)
    torch.manual_seed(0)
    kwargs = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.model_arg)}
    base = create_model(args.model, img_size=args.img_size, num_classes=10, **kwargs).eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    res: dict[str, Any] = {"what": __doc__.splitlines()[0], "model": args.model, "img_size": args.img_size,
                           "command": "python -m benchmarks.openvino_profile " + " ".join(argv or sys.argv[1:]),
                           **run_context(torch.device("cpu")), "dtype": "fp32", "runtime": "openvino",
                           "points": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, stack in points.items():
            m = apply_stack(copy.deepcopy(base), stack, calib=Calibration("synthetic:64", 8))
            res["points"][name] = {"stack": stack, "batches": {}}
            for b in batches:
                path = Path(tmp) / f"{len(res['points'])}_{b}.onnx"
                export_model(m, path, ExportConfig(batch_size=b))
                x = np.random.default_rng(0).standard_normal((b, 3, args.img_size, args.img_size), np.float32)
                ms, nodes = profile(path, x, args.repeat)
                res["points"][name]["batches"][str(b)] = {
                    "latency_ms": round(ms, 3), "counted_ms": round(sum(n["ms"] for n in nodes), 3),
                    "by_node_type": {k: round(v, 3) for k, v in summarise(nodes, "node_type").items()},
                    "by_role": {k: round(v, 3) for k, v in summarise(
                        [{**n, "role": role(n["exec_type"], n["node_type"], n["name"])} for n in nodes],
                        "role").items()},
                    "by_block": {k: round(v, 3) for k, v in summarise(
                        [{**n, "block": block_of(n["name"])} for n in nodes], "block").items()},
                    "nodes": len(nodes)}
                print(f"{name} b{b}: {ms:.1f} ms", file=sys.stderr)
    write_results(args.out, "openvino_profile", res, render(res, batches))
    return 0


def render(res: dict[str, Any], batches: list[int]) -> str:
    names = list(res["points"])
    lines = [f"# {res['what']}", "",
             f"{res['model']} at {res['img_size']} px, random weights, fp32 in OpenVINO; {res['device']}; "
             f"{res['date']}. Command: `{res['command']}`.", "",
             "Latency: median with the performance counters off. Shares: of the counters' summed node times "
             "(median per node over the repeats).", ""]
    for b in batches:
        dense = res["points"][names[0]]["batches"][str(b)]
        lines += [f"## Batch {b}", "", markdown_table(
            ["point", "latency ms", "x dense", "counted ms"],
            [[n, p["latency_ms"], round(dense["latency_ms"] / p["latency_ms"], 2), p["counted_ms"]]
             for n in names for p in [res["points"][n]["batches"][str(b)]]]), ""]
        roles = sorted({r for n in names for r in res["points"][n]["batches"][str(b)]["by_role"]})
        lines += ["By role (ms; % of the counted time)", "", markdown_table(
            ["role", *names],
            [[r, *(f"{d.get(r, 0.0):.2f} ({100 * d.get(r, 0.0) / max(p['counted_ms'], 1e-9):.0f} %)"
                   for n in names for p in [res["points"][n]["batches"][str(b)]] for d in [p["by_role"]])]
             for r in roles]), ""]
        blocks = sorted({k for n in names for k in res["points"][n]["batches"][str(b)]["by_block"]},
                        key=lambda k: (k == "outside", int(k) if k.isdigit() else 0))
        lines += ["By block (ms)", "", markdown_table(
            ["block", *names], [[k, *(res["points"][n]["batches"][str(b)]["by_block"].get(k, 0.0) for n in names)]
                                for k in blocks]), ""]
        types = sorted({t for n in names for t in res["points"][n]["batches"][str(b)]["by_node_type"]},
                       key=lambda t: -max(res["points"][n]["batches"][str(b)]["by_node_type"].get(t, 0.0)
                                          for n in names))
        lines += ["By OpenVINO node type (ms)", "", markdown_table(
            ["node type", *names],
            [[t, *(res["points"][n]["batches"][str(b)]["by_node_type"].get(t, 0.0) for n in names)]
             for t in types]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

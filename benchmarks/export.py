"""The CPU deploy path beside its peers: ``python -m benchmarks.export --out results/export``.

In one process and one run, on each model (ViT-B/16 at 224 for speed; the trained testbeds for accuracy and
speed), it exports the dense model and our compressed stacks to ONNX and times, at each batch size, against the
fastest dense torch eager setup measured here (fp32 or bf16 autocast, whichever is faster):

- ONNX Runtime fp32 on the dense export;
- ONNX Runtime on our token-merged, pruned and QDQ-int8 exports (int8 and uint8 activations), and on stacks;
- ONNX Runtime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) on the dense
  ONNX, after ``quant_pre_process``, calibrated on the same images as ours (peer);
- OpenVINO on our QDQ export;
- NNCF ``nncf.quantize`` (``ModelType.TRANSFORMER``) on the dense model in OpenVINO, same images (peer).

Accuracy (testbeds): top-1 on the clean test split and on the sensitive split, and agreement there with the
uncompressed torch model. Timing: warm-up, then alternating rounds (every variant once per round), median.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcompress import Calibration, apply_stack, create_model
from vitcompress.bench import Dtype, count_flops
from vitcompress.data import load_data
from vitcompress.evaluate import accuracy_metrics
from vitcompress.export import ExportConfig, export_model
from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.models import data_config
from vitcompress.pipeline import calibration_batches
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table

from . import variants

Fn = Callable[[np.ndarray], np.ndarray]
RECIPE = variants.load("export")  # models and variants: benchmarks/recipes/export.yaml
MODELS: dict[str, dict[str, Any]] = RECIPE["models"]


def stacks(r: int) -> dict[str, tuple[variants.Stack, str]]:
    """Our compressed variants -> (stack with ToMe's r set, QDQ activation type)."""
    return {name: ([{**step, "r": r} if step["name"] == "token_merge" else step for step in v["stack"]],
                   v.get("qdq_activations", "int8")) for name, v in RECIPE["variants"].items()}


def _ort(path: Path, threads: int) -> Fn:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})[0]


def _ov(model: Any, threads: int) -> Fn:
    import openvino as ov

    c = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": str(threads)})
    return lambda x: np.asarray(c(x)[0])


def _torch(model: torch.nn.Module, dtype: Dtype) -> Fn:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == Dtype.BF16):
            return model(torch.from_numpy(x)).float().numpy()
    return run


def _calib_arrays(model: torch.nn.Module, calib: str, n: int) -> list[np.ndarray]:
    return [x.numpy() for x, _, _ in calibration_batches(model, Calibration(data=calib, size=n))]


def ort_quantize_static(dense: Path, out: Path, calib: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(dense), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def nncf_quantize(dense: Path, calib: list[np.ndarray], n: int) -> Any:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(dense))
    return nncf.quantize(ov_model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=n)


def logits(fn: Fn, data: Any, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    for x, y, _ in data.loader(batch):
        outs.append(torch.from_numpy(np.asarray(fn(x.numpy()))).float())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def time_rounds(fns: dict[str, Fn], x: np.ndarray, rounds: int, warmup: int = 2, min_s: float = 0.05,
                ) -> dict[str, float]:
    """Median ms per call of each fn on ``x``: warm-up, then ``rounds`` rounds in which every fn runs once (in
    alternating order). A fast fn runs several calls per measurement (at least ``min_s``), so that millisecond
    calls are not timed one by one against the scheduler's jitter."""
    reps = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            t = time.perf_counter()
            fn(x)
        reps[k] = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for k in order:
            t = time.perf_counter()
            for _ in range(reps[k]):
                fns[k](x)
            times[k].append((time.perf_counter() - t) * 1e3 / reps[k])
    return {k: float(np.median(v)) for k, v in times.items()}


def _load(spec: str) -> torch.nn.Module:
    if spec.startswith("baseline:"):
        from vitcompress.train import baseline

        return create_model(str(baseline(spec.split(":", 1)[1])))
    return create_model(spec)


def run_model(key: str, spec: dict[str, Any], work: Path, threads: int, rounds: int, calib_n: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = _load(spec["spec"]).eval()
    dc = data_config(base)
    calib_n = spec.get("calib_n", calib_n)
    calib = _calib_arrays(base, spec["calib"], calib_n)
    files: dict[str, Path] = {"ORT fp32 (dense export)": work / f"{key}_dense.onnx"}
    export_model(base, files["ORT fp32 (dense export)"])
    gflops = {"torch dense": count_flops(base, dc["input_size"]) / 1e9}
    gflops["ORT fp32 (dense export)"] = gflops["torch dense"]
    for name, (stack, act) in stacks(spec["r"]).items():
        m = apply_stack(copy.deepcopy(base), stack, calib=Calibration(data=spec["calib"], size=calib_n), train=False)
        path = work / f"{key}_{len(files)}.onnx"
        export_model(m, path, ExportConfig(qdq_activations=act))
        files[f"ORT ours: {name}"] = path
        gflops[list(files)[-1]] = count_flops(m, dc["input_size"]) / 1e9
    files["ORT quantize_static (peer)"] = ort_quantize_static(files["ORT fp32 (dense export)"],
                                                              work / f"{key}_ort_static.onnx", calib)
    gflops["ORT quantize_static (peer)"] = gflops["torch dense"]
    fns: dict[str, Fn] = {"torch eager fp32": _torch(base, Dtype.FP32), "torch eager bf16": _torch(base, Dtype.BF16)}
    fns.update({k: _ort(p, threads) for k, p in files.items()})
    for ours, label in (("ORT ours: W8A8 QDQ (uint8", "OpenVINO on our W8A8 QDQ"),
                        ("ORT ours: ToMe + W8A8 QDQ mse", "OpenVINO on our ToMe + W8A8 QDQ mse")):
        key_ours = next(k for k in files if k.startswith(ours))
        fns[label] = _ov(str(files[key_ours]), threads)
        gflops[label] = gflops[key_ours]
    fns["NNCF int8 in OpenVINO (peer)"] = _ov(nncf_quantize(files["ORT fp32 (dense export)"], calib, calib_n), threads)
    gflops["NNCF int8 in OpenVINO (peer)"] = gflops["torch dense"]
    sizes = {k: round(p.stat().st_size / 2**20, 2) for k, p in files.items()}

    res: dict[str, Any] = {"model": spec["spec"], "input_size": list(dc["input_size"]), "speed": {}, "accuracy": {}}
    for bs in spec["batches"]:
        x = np.random.default_rng(0).standard_normal((bs, *dc["input_size"]), dtype=np.float32)
        ms = time_rounds(fns, x, rounds)
        best = min(("torch eager fp32", "torch eager bf16"), key=ms.get)
        res["speed"][str(bs)] = {"baseline": best, "ms": {k: round(v, 2) for k, v in ms.items()},
                                 "speedup": {k: round(ms[best] / v, 3) for k, v in ms.items()}}
        print(f"{key} batch {bs}: baseline {best} {ms[best]:.1f} ms; " + ", ".join(
            f"{k} {ms[best] / v:.2f}x" for k, v in ms.items()), flush=True)
    if spec["data"]:
        clean, sens = (load_data(d, dc) for d in spec["data"])
        ref_fn = fns["torch eager fp32"]
        ref = {d.name: logits(ref_fn, d)[0] for d in (clean, sens)}
        for k, fn in fns.items():
            row = {}
            for tag, d in (("clean", clean), ("sensitive", sens)):
                lg, lb = logits(fn, d)
                acc = accuracy_metrics(lg, lb, ref[d.name])
                row[tag] = {"top1": round(acc["top1"], 2), "agreement": round(acc["agreement"], 2)}
            res["accuracy"][k] = row
            print(f"{key} accuracy {k}: {row}", flush=True)
    res.update({"gflops": {k: round(v, 4) for k, v in gflops.items()}, "size_mb": sizes,
                "calibration_images": calib_n, "calibration_data": spec["calib"]})
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Export and deploy on the CPU: our exports and the peers, side by side", "",
             f"Device: {res['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v)
             + f"; {res['date']}.", "", f"Command: `{res['command']}`", "",
             "Speedup = the fastest dense torch eager setup's median time / the row's (> 1: faster); medians of "
             f"{res['rounds']} alternating rounds in one process. Accuracy: top-1 on the clean and sensitive splits, "
             "and agreement with the uncompressed fp32 torch model on the sensitive split.", ""]
    for key, r in res["models"].items():
        bss = list(r["speed"])
        lines += [f"## {key}: `{r['model']}` at {r['input_size'][1]} px", ""]
        acc_head = ["clean top-1", "sensitive top-1", "sensitive agreement"] if r["accuracy"] else []
        body = []
        for k in r["speed"][bss[0]]["ms"]:
            a = r["accuracy"].get(k) if r["accuracy"] else None
            body.append([k, f"{r['gflops'].get(k, r['gflops']['torch dense']):.3f}", r["size_mb"].get(k, ""),
                         *(c for b in bss for c in (r["speed"][b]["ms"][k], f"**{r['speed'][b]['speedup'][k]:.2f}x**")),
                         *([a["clean"]["top1"], a["sensitive"]["top1"], a["sensitive"]["agreement"]] if a else [])])
        lines.append(markdown_table(["variant", "GFLOPs", "file MB",
                                     *(h for b in bss for h in (f"b{b} ms", f"b{b} speedup")), *acc_head], body))
        lines += ["", "Baseline per batch: " + ", ".join(f"b{b}: {r['speed'][b]['baseline']}" for b in bss), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/export")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    out = Path(args.out)
    res: dict[str, Any] = {**run_context(torch.device("cpu")), "rounds": args.rounds, "threads": args.threads,
                           "command": "python -m benchmarks.export " + " ".join(argv or sys.argv[1:]), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key in [k.strip() for k in args.models.split(",") if k.strip()]:
            res["models"][key] = run_model(key, MODELS[key], Path(tmp), args.threads, args.rounds, args.calib_size)
            atomic_write_json(out / "export.json", res)  # after each model: a run cut short keeps what finished
            atomic_write_text(out / "export.md", markdown(res))
    print(f"wrote {out / 'export.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

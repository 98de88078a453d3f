"""The headline: ViT-B/16, every deployable method compiled, against eager and compiled dense, in one run.

    python -m benchmarks.headline --out DIR [--device cuda] [--batch-sizes 1,64,256] [--jobs 4]
                                  [--accuracy results/headline/cifar10] [--variants "NAME;NAME"]

The variants are the points of ``recipes/headline.yaml`` (a sweep recipe, whose CIFAR-10 testbed run
on the CPU gives each stack's accuracy: ``--accuracy`` reads it). Each is applied to ViT-B/16 with random weights
(recovery steps skipped: they do not change the structure), compiled by :func:`vitcompress.bench.compile_model`
(fullgraph, frozen weights, a CUDA graph per batch size on a GPU), and timed alternately with compiled dense in
one process (CUDA events or perf_counter, median). Two dense baselines, always both: eager (autocast + SDPA, timm as
users run it) and compiled (``--dense-mode``, max-autotune by default). Ratios > 1 are faster than the baseline.

``--jobs N`` first compiles the variants in N worker processes (``--warm-only``), filling Inductor's cache, so the
timing process finds every graph compiled. On a GPU, each method slower than compiled dense at batch 64 or 256
gets the top kernels of one profiled call (``--profile``). Results are written after each variant (a step cut
short by its time limit still leaves what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vitcompress import Calibration, apply_stack, create_model
from vitcompress.bench import BenchConfig, CompileMode, compare, count_flops, model_runner, static_shapes
from vitcompress.provenance import run_context
from vitcompress.report import load_points, markdown_table, write_results
from vitcompress.sweep import load_sweep

RECIPE = "headline"  # recipes/headline.yaml, bundled with the package
NO_DATA = {"data": "(unused: timing skips the recovery steps, the only ones that read data)"}
ARCH, IMG = "vit_base_patch16_224", 224  # --arch / --img-size change them (the runbook's CPU smoke run: a tiny ViT)
EAGER, COMPILED = "dense, eager", "dense, compiled"
DENSE = "__dense__"  # the warm-up worker that compiles the dense baseline
GOAL_TOME, GOAL_FP8 = "ToMe 0.59x (r=13 on ViT-B)", "W8A8 fp8 static"
# timed first, so that a step cut short by its time limit still judges the goals
FIRST = [GOAL_TOME, GOAL_FP8, "ToMe 0.52x + fp8", "ToMe 0.59x + fp8", "W8A8 int8 static",
         "heads -25 % MLP -50 % + distill", "ToMe 0.59x + int8"]
WITHIN_PT = 1.0  # the best stack is chosen among those within this many points of CIFAR-10 top-1


def variants(names: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """name -> stack, from the recipe (optionally only the ``;``-separated ``names``: names hold commas)."""
    found = {p["name"]: p["stack"] for p in load_sweep(RECIPE, NO_DATA).points}
    stacks = {n: found[n] for n in FIRST if n in found} | found
    if not names:
        return stacks
    wanted = [n.strip() for n in names.split(";") if n.strip()]
    unknown = [n for n in wanted if n not in stacks]
    if unknown:
        sys.exit(f"headline: unknown variant(s) {unknown}; known: {list(stacks)}")
    return {n: stacks[n] for n in wanted}


def build(base: torch.nn.Module, stack: list[dict[str, Any]], device: torch.device) -> torch.nn.Module:
    """``stack`` on a copy of ``base`` (calibrated on 8 digits images: speed does not depend on the values)."""
    model = apply_stack(copy.deepcopy(base).to(device), stack, calib=Calibration("digits", 8), train=False)
    return model.to(device).eval()


def _cfg(device: torch.device, compiled: bool, mode: CompileMode, dtype: str) -> BenchConfig:
    warm_s = float(os.environ.get("VITCOMPRESS_BENCH_WARMUP_S", "0.3"))
    return BenchConfig(device=str(device), dtype=dtype, compile=compiled, compile_mode=mode, warmup=2,
                       warmup_s=warm_s)


def dense_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The random-weight ``--arch`` at ``--img-size`` (eval mode, CPU) and its input shape [3, H, W]."""
    return create_model(args.arch, img_size=args.img_size).eval(), (3, args.img_size, args.img_size)


def warm_only(names: str, args: argparse.Namespace) -> int:
    """Compile each variant at each batch size once (a worker of ``--jobs``: fills Inductor's cache); the name
    ``DENSE`` compiles the dense model in ``--dense-mode`` (max-autotune's GEMM search is the longest compile)."""
    device, dtype, dense_mode = torch.device(args.device), args.dtype, args.dense_mode
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    base, size = dense_model(args)
    if names == DENSE:
        model = base.to(device)
        for bs in batch_sizes:
            model_runner(model, bs, size, _cfg(device, True, CompileMode(dense_mode), dtype))()
        print("warm: dense", flush=True)
        return 0
    for name, stack in variants(names).items():
        t = time.time()
        model = build(base, stack, device)
        for bs in batch_sizes:
            model_runner(model, bs, size, _cfg(device, True, CompileMode.DEFAULT, dtype))()
        print(f"warm: {name} in {time.time() - t:.0f} s", flush=True)
    return 0


def _spawn_warmers(names: list[str], jobs: int, args: argparse.Namespace) -> None:
    groups = [DENSE] + [";".join(names[i::jobs - 1]) for i in range(jobs - 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.headline", "--warm-only", "--out", str(args.out),
                               "--device", args.device, "--dtype", args.dtype, "--batch-sizes", args.batch_sizes,
                               "--dense-mode", args.dense_mode, "--arch", args.arch, "--img-size", str(args.img_size),
                               "--variants", g]) for g in groups if g]
    for p in procs:
        p.wait()


def top_kernels(fn: Any, n: int = 6) -> list[dict[str, Any]]:
    """The ``n`` kernels with the most CUDA time in one call of ``fn`` (after it is warm)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0.0), reverse=True)
    return [{"kernel": e.key[:90], "calls": e.count, "ms": round(getattr(e, "device_time_total", 0.0) / 1e3, 4)}
            for e in events[:n]]


def accuracy_of(sweep_dir: Path | None) -> dict[str, dict[str, float]]:
    """Per point name: CIFAR-10 top-1, its drop from the base, and cifar10-c agreement (the CPU sweep's)."""
    if sweep_dir is None or not (sweep_dir / "sweep.json").is_file():
        return {}
    desc, points = load_points(sweep_dir)
    spec = desc["config"]["accuracy"].rpartition(":")[0]  # the sweep's accuracy DATA (validated to be evaluated)
    out: dict[str, dict[str, float]] = {}
    for p in points:
        acc = p.get("accuracy", {})
        clean = acc.get(spec, {})
        corrupt = next((v for k, v in acc.items() if k.startswith("cifar10-c")), {})
        out[p["name"]] = {"top1": clean.get("top1"), "agreement_c": corrupt.get("agreement")}
    base = out.get("base (uncompressed)", {}).get("top1")
    for v in out.values():
        v["delta"] = None if base is None or v["top1"] is None else round(v["top1"] - base, 2)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    chosen = variants(args.variants)
    if args.jobs > 1:
        t = time.time()
        _spawn_warmers(list(chosen), args.jobs, args)
        print(f"headline: {args.jobs} warm-up workers took {time.time() - t:.0f} s", flush=True)
    base, size = dense_model(args)
    dense_flops = count_flops(base, size)
    base = base.to(device)
    res: dict[str, Any] = {**run_context(device), "arch": args.arch, "img_size": args.img_size,
                           "batch_sizes": sizes, "dtype": args.dtype,
                           "dense_compile_mode": args.dense_mode, "compile_mode": "default",
                           "gemm_table": os.environ.get("VITCOMPRESS_GEMM_TABLE",
                                                        "vitcompress/kernels/tuned/<arch>.json"),
                           "command": "python -m benchmarks.headline " + " ".join(sys.argv[1:]),
                           "accuracy_source": str(args.accuracy) if args.accuracy else None,
                           "accuracy": accuracy_of(args.accuracy), "dense": {}, "rows": {}}
    t = time.time()
    dense_runners = {}
    for bs in sizes:
        eager = model_runner(base, bs, size, _cfg(device, False, CompileMode.DEFAULT, args.dtype))
        compiled = model_runner(base, bs, size, _cfg(device, True, CompileMode(args.dense_mode), args.dtype))
        r = compare(eager, compiled, device=device, warmup=2, repeat=args.repeat)
        res["dense"][str(bs)] = {"eager_ms": r["a_median_ms"], "compiled_ms": r["b_median_ms"],
                                 "compiled_vs_eager": r["speedup"], "dtype": str(eager.dtype)}
        dense_runners[bs] = compiled
        write(args.out, res)
    res["dense_seconds"] = round(time.time() - t, 1)
    for name, stack in chosen.items():
        t = time.time()
        row: dict[str, Any] = {"stack": stack, "by_batch": {}}
        try:
            model = build(base, stack, device)
            row["gflops_ratio"] = round(count_flops(copy.deepcopy(model).cpu(), size) / dense_flops, 4)
            row["cuda_graphs"] = device.type == "cuda" and static_shapes(model)
            for bs in sizes:
                fn = model_runner(model, bs, size, _cfg(device, True, CompileMode.DEFAULT, args.dtype))
                r = compare(dense_runners[bs], fn, device=device, warmup=2, repeat=args.repeat)
                d = res["dense"][str(bs)]
                row["by_batch"][str(bs)] = {"ms": r["b_median_ms"], "vs_compiled": r["speedup"],
                                            "vs_eager": d["eager_ms"] / r["b_median_ms"], "dtype": str(fn.dtype)}
                if args.profile and device.type == "cuda" and bs >= 64 and r["speedup"] < 1.0:
                    row.setdefault("top_kernels", {})[str(bs)] = top_kernels(fn)
            del model
        except Exception as e:  # one broken variant must not cost the others their time  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row["seconds"] = round(time.time() - t, 1)
        res["rows"][name] = row
        write(args.out, res)
        print(f"headline: {name}: {row.get('error') or 'ok'} ({row['seconds']} s)", flush=True)
    return res


def best_stack(res: dict[str, Any], bs: str) -> tuple[str | None, dict[str, Any] | None]:
    """The fastest variant at batch ``bs`` (against compiled dense) within WITHIN_PT of the testbed's top-1."""
    acc = res.get("accuracy", {})
    ok = [(n, r) for n, r in res["rows"].items() if bs in r.get("by_batch", {})
          and acc.get(n, {}).get("delta") is not None and acc[n]["delta"] >= -WITHIN_PT]
    if not ok:
        return None, None
    return max(ok, key=lambda t: t[1]["by_batch"][bs]["vs_compiled"])


def goals(res: dict[str, Any]) -> list[list[Any]]:
    """[goal, measured, met] for issue #27's goals that this run can judge."""
    sizes = [str(b) for b in res["batch_sizes"]]
    out: list[list[Any]] = []

    def ratio(name: str, bs: str, key: str) -> float | None:
        return res["rows"].get(name, {}).get("by_batch", {}).get(bs, {}).get(key)

    for name, bs, key, floor in ((GOAL_FP8, "256", "vs_compiled", 1.25), (GOAL_TOME, "256", "vs_compiled", 1.4)):
        if bs in sizes:
            v = ratio(name, bs, key)
            out.append([f"{name} >= {floor}x compiled dense at batch {bs}", v, None if v is None else v >= floor])
    name, _ = best_stack(res, "256" if "256" in sizes else sizes[-1])
    if name is not None:
        for bs, key, floor in (("1", "vs_eager", 3.0), ("256", "vs_eager", 3.0), ("256", "vs_compiled", 1.6)):
            if bs in sizes:
                v = ratio(name, bs, key)
                base = "eager" if key == "vs_eager" else "compiled"
                out.append([f"best stack within {WITHIN_PT:g} pt ({name}) >= {floor}x {base} dense at batch {bs}", v,
                            None if v is None else v >= floor])
    for n, r in res["rows"].items():
        slow = [bs for bs in ("64", "256") if bs in r.get("by_batch", {}) and r["by_batch"][bs]["vs_compiled"] < 1.0]
        if slow:
            out.append([f"{n} >= 1.0x compiled dense at batch {', '.join(slow)}",
                        min(r["by_batch"][bs]["vs_compiled"] for bs in slow), False])
    return out


def markdown(res: dict[str, Any]) -> str:
    sizes = [str(b) for b in res["batch_sizes"]]
    acc = res.get("accuracy", {})
    lines = [f"# Headline: {res['arch']} compiled, {res.get('device', '?')}", "",
             f"{res['date']}; versions {res['versions']}; dtype {res['dtype']}. Compressed models: fullgraph "
             f"`torch.compile` (Inductor, frozen weights) with a CUDA graph per batch size where shapes are static; "
             f"compiled dense: mode `{res['dense_compile_mode']}`. Timed alternately with compiled dense in one "
             "process, median. Accuracy: the same stack on the CIFAR-10 testbed (CPU, "
             f"`{res.get('accuracy_source')}`), top-1 and its change from the base, cifar10-c agreement.", "",
             f"Command: `{res['command']}`", ""]
    dense = res.get("dense", {})
    lines += ["## Dense baselines", "", markdown_table(
        ["batch", "eager ms", "compiled ms", "compiled vs eager"],
        [[bs, dense[bs]["eager_ms"], dense[bs]["compiled_ms"], dense[bs]["compiled_vs_eager"]]
         for bs in sizes if bs in dense], digits=3), ""]
    header = ["method", "GFLOPs", "graphs"] + [f"b{bs} ms" for bs in sizes] + \
        [f"b{bs} vs compiled" for bs in sizes] + [f"b{bs} vs eager" for bs in sizes] + \
        ["CIFAR-10 top-1", "change (pt)", "cifar10-c agreement"]
    rows = []
    for n, r in res.get("rows", {}).items():
        a = acc.get(n, {})
        if "error" in r:
            rows.append([n, r.get("gflops_ratio"), "-"] + ["-"] * (3 * len(sizes)) +
                        [a.get("top1"), a.get("delta"), a.get("agreement_c")])
            continue
        b = r["by_batch"]
        rows.append([n, r.get("gflops_ratio"), "yes" if r.get("cuda_graphs") else "no"] +
                    [b.get(bs, {}).get("ms") for bs in sizes] + [b.get(bs, {}).get("vs_compiled") for bs in sizes] +
                    [b.get(bs, {}).get("vs_eager") for bs in sizes] + [a.get("top1"), a.get("delta"),
                                                                       a.get("agreement_c")])
    lines += ["## Methods, compiled", "", markdown_table(header, rows, digits=3), ""]
    errors = {n: r["error"] for n, r in res.get("rows", {}).items() if "error" in r}
    if errors:
        lines += ["Failed: " + "; ".join(f"{n}: {e}" for n, e in errors.items()), ""]
    gpu = not str(res.get("device", "cpu")).startswith("cpu")
    lines += ["## Goals (issue #27)", "", "" if gpu else "The goals are set for a GPU; on this CPU they are shown for "
              "reference only.", "", markdown_table(["goal", "measured", "met"], goals(res), digits=2), ""]
    profiled = {n: r["top_kernels"] for n, r in res.get("rows", {}).items() if r.get("top_kernels")}
    if profiled:
        lines += ["## Why the slower ones are slower: top kernels of one call", ""]
        for n, by in profiled.items():
            for bs, ks in by.items():
                lines += [f"**{n}**, batch {bs}:", "", markdown_table(["kernel", "calls", "ms"],
                                                                      [[k["kernel"], k["calls"], k["ms"]] for k in ks],
                                                                      digits=4), ""]
    return "\n".join(lines)


def write(out: Path, res: dict[str, Any]) -> None:
    write_results(out, "headline", res, markdown(res))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="autocast dtype (auto: bf16 on CUDA, the faster on a CPU)")
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--arch", default=ARCH, help="timm model id (random weights)")
    p.add_argument("--img-size", type=int, default=IMG)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1, help="compile in this many worker processes first (one of them "
                   "compiles the dense baseline)")
    p.add_argument("--dense-mode", default="max-autotune", choices=[m.value for m in CompileMode])
    p.add_argument("--variants", help="point names of the recipe, separated by ';' (default: all)")
    p.add_argument("--accuracy", type=Path, help="the recipe's CIFAR-10 sweep directory (CPU)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rewrite", action="store_true", help="only rewrite OUT/headline.md from OUT/headline.json")
    args = p.parse_args(argv)
    if args.rewrite:
        write(args.out, json.loads((args.out / "headline.json").read_text()))
        return 0
    if args.warm_only:
        return warm_only(args.variants or "", args)
    res = run(args)
    write(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hopper code generation of every kernel config, without a GPU: ``python -m benchmarks.codegen --out DIR``.

Each autotune config of each kernel is compiled by Triton for ``sm_90a`` (H100 / H200) at a ViT-B shape, with
the specialization its wrapper's launch gets (ints equal to 1 become constants, multiples of 16 and tensor
pointers carry a divisibility hint). Reported per config: the tensor-core instruction in the PTX (``wgmma``,
Hopper's warpgroup MMA, or Ampere's ``mma.sync``), shared memory per block (a block may use 227 KiB), and the
registers per thread and spill bytes from Triton's own ``ptxas -v``. These are compiler facts, not speed: a
config that spills or overflows shared memory is one the autotuner will discard or find slow on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitcompress.io import atomic_write_json, atomic_write_text
from vitcompress.kernels import attention, bsr_gemm, fp8_gemm, int8_gemm
from vitcompress.kernels._triton import interpreting
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
M, K, N, TOKENS, HEADS, HEAD_DIM = 197 * 256, 768, 3072, 577, 12, 64  # ViT-B fc1 at batch 256; ViT-B attention


@dataclasses.dataclass
class Spec:
    """One kernel build: pointer dtypes (Triton type strings), int arguments, constexprs, the configs to try."""

    name: str
    module: str  # vitcompress.kernels.<module>
    fn: str  # the @triton.jit function's name there
    pointers: dict[str, str]
    ints: dict[str, int]
    floats: tuple[str, ...]
    const: dict[str, Any]
    configs: list[dict[str, int]]


def specs() -> list[Spec]:
    """The launches the wrappers make at ViT-B shapes (int8 weights column-major, as Int8Linear stores them)."""
    import triton.language as tl

    gemm_ints = dict(M=M, N=N, K=K, s_am=K, s_ak=1, s_wk=1, s_wn=K, s_om=N, s_on=1)
    out = []
    for name, dt, acc, gelu, configs in (
            ("int8_gemm + bias", "i8", tl.int32, False, int8_gemm.GEMM_CONFIGS),
            ("int8_gemm + bias + GELU", "i8", tl.int32, True, int8_gemm.GEMM_CONFIGS),
            ("fp8_gemm + bias", "fp8e4nv", tl.float32, False, fp8_gemm.GEMM_CONFIGS)):
        out.append(Spec(name, "int8_gemm", "_gemm_kernel",
                        {"a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "o_ptr": "*bf16", "sa_ptr": "*fp32", "sw_ptr": "*fp32",
                         "b_ptr": "*bf16"}, gemm_ints, (), dict(HAS_BIAS=True, GELU=gelu, ACC_TYPE=acc), configs))
    out.append(Spec("bsr_gemm, 64-blocks", "bsr_gemm", "_bsr_kernel",
                    {"x_ptr": "*bf16", "crow_ptr": "*i64", "col_ptr": "*i64", "v_ptr": "*bf16", "b_ptr": "*bf16",
                     "o_ptr": "*bf16"}, dict(M=M, N=N, K=K, s_xm=K, s_xk=1, s_om=N, s_on=1), (),
                    dict(HAS_BIAS=True, DOT_F32=False, B=64), bsr_gemm.CONFIGS))
    n, d, h = TOKENS, HEAD_DIM, HEADS
    c = h * d  # q, k, v are views of qkv's [B, N, 3, H, D] output; the output is [B, N, H, D] memory
    qkv = dict(b=n * 3 * c, h=d, n=3 * c)
    strides = {**{f"s_{t}{a}": v for t in "qkv" for a, v in qkv.items()}, "s_ob": n * c, "s_oh": d, "s_on": c,
               "s_kbb": n}
    attn_ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KB": "*fp32", "Out": "*bf16"}
    flags = dict(HAS_BIAS=True, DOT_F32=False, D=d, D_PAD=d)
    nb = -(-n // 64)
    out.append(Spec("attention + key bias, 577 tokens", "attention", "_fwd_kernel",
                    {**attn_ptrs, "SL": "*bf16", "BM": "*bf16"},
                    dict(H=h, N=n, NK=1, **strides, s_bmb=0, s_bmh=0, s_bmq=0, s_bmk=0), ("qk_scale",),
                    dict(HAS_LENS=False, HAS_BLOCKS=False, NK_PAD=1, **flags), attention.CONFIGS))
    out.append(Spec("attention + key bias + lengths, 64-block mask", "attention", "_fwd_kernel",
                    {**attn_ptrs, "SL": "*i32", "BM": "*u8"},
                    dict(H=h, N=n, NK=nb, **strides, s_bmb=0, s_bmh=0, s_bmq=nb, s_bmk=1), ("qk_scale",),
                    dict(HAS_LENS=True, HAS_BLOCKS=True, NK_PAD=16, BLOCK_M=64, BLOCK_N=64, **flags),
                    attention.SPARSE_CONFIGS))
    out.append(Spec("layernorm + per-token int8 quantize", "int8_gemm", "_quant_rows_kernel",
                    {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32"},
                    dict(K=K, s_xm=K, s_qm=K), ("eps",), dict(LN=True, BLOCK_K=1024), [{}]))
    return out


def compile_sm90(spec: Spec, config: dict[str, int]) -> Any:
    """Compile one config of ``spec`` for sm_90a (no device needed): Triton's CompiledKernel. Needs a process
    without TRITON_INTERPRET (set, it turns triton.language's own jit helpers into interpreter functions)."""

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"vitcompress.kernels.{spec.module}")
    mod.tl = tl  # the kernel files bind triton.language when they first build (triton is imported lazily)
    fn = JITFunction(getattr(mod, spec.fn))  # not triton.jit: that returns an interpreter under TRITON_INTERPRET
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    const = {**spec.const, **meta}
    if "EVEN_K" in fn.arg_names:
        const["EVEN_K"] = spec.ints["K"] % const["BLOCK_K"] == 0
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const:
            signature[arg], constexprs[arg] = "constexpr", const[arg]
        elif arg in spec.pointers:
            signature[arg], attrs[(i,)] = spec.pointers[arg], [["tt.divisibility", 16]]
        elif arg in spec.floats:
            signature[arg] = "fp32"
        elif spec.ints[arg] == 1:  # what the JIT does with an int argument equal to 1
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if spec.ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)})


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from Triton's bundled ``ptxas -v`` for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(90) if get_ptxas.__code__.co_argcount else get_ptxas()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([getattr(tool, "path", tool), "-v", "--gpu-name=sm_90a", str(path), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def inspect(spec: Spec, config: dict[str, int]) -> dict[str, Any]:
    """One row: the config, its tensor-core instruction, shared memory, registers and spills."""
    k = compile_sm90(spec, config)
    ptx = k.asm["ptx"]
    regs, spill = ptxas_usage(ptx)
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    return {"kernel": spec.name, "config": config, "mma": mma, "smem_bytes": int(k.metadata.shared),
            "fits_smem": int(k.metadata.shared) <= SMEM_LIMIT, "registers": regs, "spill_bytes": spill,
            "tile_buffers": tile_buffers(k.asm["ttgir"])}


def tile_buffers(ttgir: str) -> int:
    """How many copies of a 2-D tile the software pipeliner keeps in shared memory (the leading dimension of the
    multi-buffered allocations in the TTGIR): loads in flight while a tile is multiplied. 1 = not pipelined."""
    depths = [int(d) for d in re.findall(r"local_alloc\b[^\n]*?memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depths, default=1)


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Kernel code generation for Hopper (sm_90a), compiled on a machine without a GPU", "",
             f"Triton {res['versions']['triton']}, torch {res['versions']['torch']}; {res['date']}; compiled on "
             f"{res['device']}. Compiler output only: nothing here was run, and none of it is a speed figure. ViT-B "
             f"shapes: GEMMs M = {M}, K = {K}, N = {N} (int8 / e4m3 weights column-major); attention {HEADS} heads x "
             f"{TOKENS} tokens x {HEAD_DIM}. The GPU's own Triton may differ.", "",
             markdown_table(["kernel", "config", "tensor cores", "tile buffers", "shared memory KiB", "fits",
                             "registers", "spill bytes"],
                            [[r["kernel"], ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "default", r["mma"],
                              r["tile_buffers"], f"{r['smem_bytes'] / 1024:.0f}",
                              "yes" if r["fits_smem"] else "**no**", r["registers"], r["spill_bytes"]]
                             for r in res["rows"]], align="lllrrlrr")]
    spills: dict[str, int] = {}
    for r in res["rows"]:
        if r["spill_bytes"]:
            spills[r["kernel"]] = spills.get(r["kernel"], 0) + 1
    listed = "; ".join(f"{k} ({n} of its configs)" for k, n in spills.items()) or "none"
    lines += ["", f"Configs that spill: {listed}. The autotuner times every config on the GPU, so one that spills "
              "is only picked if it is still the fastest.", "",
              "Tile buffers: the copies of each operand tile the software pipeliner keeps in shared memory (loads in "
              "flight while one tile is multiplied). In bsr_gemm, x's tile address depends on a loaded column index, "
              "and for such a chain the pipeliner keeps 1 + (num_stages - 1) // 2 buffers, so its configs use "
              "num_stages 3, 5 and 7 for 2, 3 and 4 buffers."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    if interpreting():  # triton.language's own jit helpers were built for the interpreter at import
        print("error: unset TRITON_INTERPRET: code generation compiles for the GPU", file=sys.stderr)
        return 2
    rows = [inspect(s, c) for s in specs() for c in s.configs]
    res = {**run_context(torch.device("cpu")), "target": "sm_90a", "rows": rows}  # compiled here, for sm_90a
    atomic_write_json(args.out / "codegen_sm90.json", res)
    atomic_write_text(args.out / "codegen_sm90.md", markdown(res))
    print(f"wrote {args.out / 'codegen_sm90.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

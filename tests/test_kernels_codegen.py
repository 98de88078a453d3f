"""Every kernel config compiles for Hopper (sm_90a) on a machine without a GPU, with Triton's own compiler.

What this proves without a device: each autotune config fits in a block's shared memory, the GEMMs and attention
lower to Hopper's warpgroup MMA (``wgmma``, not the Ampere path; for 8-bit operands that needs the column-major
weights Int8Linear stores), each kernel's first config does not spill registers, and the loads are software
pipelined (tile buffers in shared memory). Speed is only measured on
the GPU (``python -m benchmarks.kernels``). The compiler runs in a child process: the test session sets
TRITON_INTERPRET, under which Triton can only interpret.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")


def test_every_config_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--out", str(tmp_path)], env=env, check=True,
                   capture_output=True)
    rows = json.loads((tmp_path / "codegen_sm90.json").read_text())["rows"]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    assert len(kernels) == 7 and all(r["fits_smem"] for r in rows), rows
    assert {r["mma"] for r in rows if "quantize" not in r["kernel"]} == {"wgmma"}, rows
    firsts = [next(r for r in rows if r["kernel"] == k) for k in kernels]
    assert all(r["spill_bytes"] == 0 for r in firsts), firsts
    # software pipelining: every tiled kernel keeps loads in flight; bsr_gemm's index-dependent loads reach 4 deep
    assert all(r["tile_buffers"] >= 2 for r in rows if "quantize" not in r["kernel"]), rows
    assert max(r["tile_buffers"] for r in rows if r["kernel"].startswith("bsr_gemm")) >= 4, rows
    md = (tmp_path / "codegen_sm90.md").read_text()
    assert "sm_90a" in md and "| bsr_gemm, 64-blocks | BLOCK_M=64" in md and "none of it is a speed figure" in md


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only where the session interprets Triton")
def test_codegen_refuses_the_interpreter_in_one_line(tmp_path, capsys):
    from benchmarks import codegen

    assert codegen.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unset TRITON_INTERPRET" in err

"""Every kernel config compiles for Hopper (sm_90a) on a machine without a GPU, with Triton's own compiler.

What this proves without a device: each autotune config fits in a block's shared memory, the GEMMs and attention
lower to Hopper's warpgroup MMA (``wgmma``, not the Ampere path; for 8-bit operands that needs the column-major
weights Int8Linear stores), and each kernel's first config does not spill registers. Speed is only measured on
the GPU (``python -m vitcompress.bench.kernels``).
"""

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from vitcompress.bench import codegen  # noqa: E402

SPECS = {s.name: s for s in codegen.specs()}


@pytest.mark.parametrize("name", list(SPECS))
def test_every_config_compiles_for_sm90(name):
    spec = SPECS[name]
    rows = [codegen.inspect(spec, c) for c in spec.configs]
    assert all(r["fits_smem"] for r in rows), rows
    if "quantize" not in name:
        assert {r["mma"] for r in rows} == {"wgmma"}, rows
    assert rows[0]["spill_bytes"] == 0, rows[0]


def test_codegen_report_writes_a_table(tmp_path, monkeypatch):
    spec = SPECS["bsr_gemm, 64-blocks"]
    monkeypatch.setattr(codegen, "specs", lambda: [codegen.Spec(**{**spec.__dict__, "configs": spec.configs[:1]})])
    assert codegen.main(["--out", str(tmp_path)]) == 0
    md = (tmp_path / "codegen_sm90.md").read_text()
    assert "sm_90a" in md and "| bsr_gemm, 64-blocks | BLOCK_M=64" in md and "none of it is a speed figure" in md

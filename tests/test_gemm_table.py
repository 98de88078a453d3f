"""The per-architecture GEMM table that ``backend="auto"`` reads: its format, the choice it makes per shape, the
committed Hopper table, and the tuner that writes it (smoke mode, through Triton's interpreter on the CPU)."""

import json

import pytest
import torch

from vitcompress.kernels import tune, tuned
from vitcompress.kernels._triton import runs_kernel
from vitcompress.kernels.tuned import GemmPath, lookup, read_table

SM90 = tuned.TUNED_DIR / "sm90.json"


def _table(tmp_path, entries, version=1):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": version, "entries": entries}))
    return path


def test_lookup_takes_the_nearest_row_count_in_log_space_and_vendor_elsewhere(tmp_path):
    table = read_table(_table(tmp_path, {"int8:64x32": {"m": [16, 4096], "best": ["vendor", "triton"]}}))
    assert lookup(table, "int8", 20, 64, 32) == GemmPath.VENDOR
    assert lookup(table, "int8", 3000, 64, 32) == GemmPath.TRITON
    assert lookup(table, "int8", 10**6, 64, 32) == GemmPath.TRITON
    assert lookup(table, "int8", 3000, 64, 48) == GemmPath.VENDOR  # a shape the table does not hold
    assert lookup(table, "fp8", 3000, 64, 32) == GemmPath.VENDOR
    assert lookup(None, "int8", 3000, 64, 32) == GemmPath.VENDOR


@pytest.mark.parametrize("bad", [
    {"version": 2, "entries": {}},
    {"version": 1},
    {"version": 1, "entries": {"int8:1x1": {"m": [1, 2], "best": ["vendor"]}}},
    {"version": 1, "entries": {"int8:1x1": {"m": [1], "best": ["fastest"]}}},
])
def test_a_malformed_table_is_refused_naming_the_file(tmp_path, bad):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json"):
        read_table(path)


def test_the_cpu_has_no_table_and_auto_never_runs_a_kernel_there():
    assert tuned.gemm_path("int8", 4096, 768, 768, torch.device("cpu")) == GemmPath.VENDOR
    assert not runs_kernel("auto", torch.zeros(2), shape=("int8", 2, 2, 2))


def test_the_committed_hopper_table_never_picks_the_slower_path():
    """In ``auto`` no drop-in kernel is slower than the vendor path it replaces, at any shape in the table: each
    row's choice is the faster of the two measured paths."""
    table = read_table(SM90)
    assert table["arch"] == "sm90" and table["entries"]
    for key, e in table["entries"].items():
        op, _, nk = key.partition(":")
        n, k = (int(v) for v in nk.split("x"))
        for i, m in enumerate(e["m"]):
            vendor, triton = e["ms"]["vendor"][i], e["ms"]["triton"][i]
            want = GemmPath.TRITON if triton < vendor else GemmPath.VENDOR
            assert lookup(table, op, m, n, k) == want, (key, m)


def test_the_table_override_variable_is_read(tmp_path, monkeypatch):
    path = _table(tmp_path, {"fp8:8x8": {"m": [1], "best": ["triton"]}})
    monkeypatch.setenv("VITCOMPRESS_GEMM_TABLE", str(path))
    assert lookup(tuned.table_for("sm90"), "fp8", 1, 8, 8) == GemmPath.TRITON


def test_the_tuner_writes_a_table_that_loads(tmp_path):
    out = tmp_path / "smoke.json"
    assert tune.main(["--smoke", "--repeat", "1", "--out", str(out)]) == 0
    table = read_table(out)
    assert set(table["entries"]) == {"int8:48x32", "fp8:48x32", "attention:9x16", "attention:5x16"}
    for e in table["entries"].values():
        assert set(e["ms"]) == {"vendor", "triton", "dense"} and len(e["best"]) == len(e["m"])


def test_dense_fallback_keeps_the_layers_the_table_measured_faster_in_bf16(tmp_path, monkeypatch):
    """W8A8 for a GPU: a layer whose quantized GEMM the table measured slower than bf16 stays bf16, recorded in
    the artifact and replayed when it loads."""
    from conftest import TINY

    from vitcompress import compress_, create_model, load_artifact, model_info, save_artifact
    from vitcompress.transforms import QuantConfig

    table = {"version": 1, "arch": "sm90", "entries": {
        "int8:256x64": {"m": [100], "best": ["vendor"], "ms": {"vendor": [2.0], "triton": [3.0], "dense": [1.0]}},
        "int8:192x64": {"m": [100], "best": ["vendor"], "ms": {"vendor": [1.0], "triton": [3.0], "dense": [2.0]}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("VITCOMPRESS_GEMM_TABLE", str(path))
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    calib = [(torch.randn(8, 3, 32, 32), torch.zeros(8))]
    compress_(model, QuantConfig(mode="deploy", dense_fallback="sm90", dense_fallback_rows=100), calib=calib)
    state = model_info(model).transforms[-1]["state"]
    assert state["kept_dense"] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]  # fc1 (256x64): bf16 was faster
    assert type(model.blocks[0].mlp.fc1) is torch.nn.Linear and type(model.blocks[0].attn.qkv).__name__ == "Int8Linear"
    save_artifact(model, tmp_path / "a")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        again = load_artifact(tmp_path / "a")
        assert type(again.blocks[1].mlp.fc1) is torch.nn.Linear and torch.equal(again(x), model(x))


def test_dense_fallback_on_the_committed_hopper_table_and_bad_settings():
    from vitcompress.errors import ConfigError
    from vitcompress.transforms import QuantConfig
    from vitcompress.transforms.quantize.transform import dense_fallback_layers

    layers = [("fc1", torch.nn.Linear(768, 3072)), ("qkv", torch.nn.Linear(768, 2304))]
    cfg = QuantConfig(mode="deploy", dense_fallback="sm90", dense_fallback_rows=197)  # ViT-B/16 at batch 1
    assert dense_fallback_layers(layers, cfg) == ["fc1"]  # the H200 run: fc1 bf16 0.042 ms, int8 0.071 ms
    with pytest.raises(ConfigError, match="needs --mode deploy"):
        QuantConfig(dense_fallback="sm90")
    with pytest.raises(ConfigError, match="no GEMM table for 'sm75'"):
        QuantConfig(mode="deploy", dense_fallback="sm75")

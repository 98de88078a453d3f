"""torchrun: data-parallel eval equals the single-process run; a 2-process sweep writes every point once."""

import json
import subprocess
import sys

import pytest
import yaml

from vitcompress import compress_, create_model, save_artifact
from vitcompress.distributed import batch_indices, reassemble
from vitcompress.transforms import TokenMergeConfig


def _torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitcompress", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("n, bs", [(10, 3), (64, 64), (65, 64), (1, 8)])
def test_batches_partition_the_items_in_order(n, bs):
    parts = [batch_indices(n, bs, r, 2) for r in range(2)]
    items = sorted(i for _, it in parts for i in it)
    assert items == list(range(n))
    for batches, it in parts:
        assert it == [i for b in batches for i in range(b * bs, min(b * bs + bs, n))]
    tensors = reassemble([(b, [f"batch{x}" for x in b]) for b, _ in parts])
    assert tensors == [f"batch{x}" for x in range((n + bs - 1) // bs)]


def test_two_process_eval_matches_single_process(trained_artifact, tmp_path, cli):
    merged = create_model(str(trained_artifact))
    compress_(merged, TokenMergeConfig(r=2))
    save_artifact(merged, tmp_path / "merged")
    args = ["eval", tmp_path / "merged", "--data", "digits-c", "--limit", "300", "--batch-size", "32", "--no-speed",
            "--dtype", "fp32"]  # pinned: auto is measured per process, and the two runs must compute the same thing
    _torchrun(*args, "--json", tmp_path / "ddp.json", cwd=tmp_path)
    rc, _, err = cli(*args, "--json", tmp_path / "one.json")
    assert rc == 0, err
    ddp, one = (json.loads((tmp_path / f).read_text()) for f in ("ddp.json", "one.json"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    for key in ("n_images", "top1", "top5", "agreement"):
        assert ddp[key] == one[key], key
    assert ddp["kl"] == pytest.approx(one["kl"], rel=1e-4, abs=1e-7)
    assert {g: (m["top1"], m["agreement"]) for g, m in ddp["groups"].items()} == \
        {g: (m["top1"], m["agreement"]) for g, m in one["groups"].items()}


def test_two_process_sweep_writes_every_point_once(trained_artifact, tmp_path):
    recipe = {"sweep": {
        "base": {"artifact": str(trained_artifact)}, "eval_data": ["digits"], "eval_limit": 16,
        "accuracy": "digits:top1", "calib_size": 8,
        "bench": {"device": "cpu", "batch_sizes": [1], "warmup": 0, "warmup_s": 0, "repeat": 1},
        "grid": [{"name": "ToMe r={r}", "stack": [{"name": "token_merge"}], "product": {"0.r": [1, 2, 3, 4]}}]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _torchrun("sweep", tmp_path / "r.yaml", "--out", tmp_path / "s", cwd=tmp_path)
    records = [json.loads(p.read_text()) for p in (tmp_path / "s" / "points").glob("*.json")]
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in sweep["points"])  # each exactly once
    assert {r["rank"] for r in records} == {0, 1} and all(r["status"] == "ok" for r in records)
    assert (tmp_path / "s" / "report.md").exists()

"""The GPU runbook (benchmarks/gpu.sh) in its CPU smoke mode: every step, with the same scripts and flags, on a tiny
ViT, so that a script or flag bug fails here and not on a lent GPU (whose minutes do not come back)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "benchmarks" / "gpu.sh"
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
STEPS = ["headline-table", "headline", "tests", "speed", "kernels-gemm", "kernels-bsr", "kernels-attention",
         "kernels-merge", "sweep"]


@pytest.mark.skipif(shutil.which("bash") is None or not RUNBOOK.exists(), reason="needs bash and the checkout")
def test_the_gpu_runbook_runs_every_step_in_its_cpu_smoke_mode(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "COLUMNS": "80",
           "SEARCH_DATA": str(SHARED_CIFAR10)}
    run = subprocess.run(["bash", str(RUNBOOK)], env=env, capture_output=True, text=True, timeout=1200)
    log = (tmp_path / "runbook.log").read_text()
    ended = dict(re.findall(r"^=== (\S+): rc=(\d+)", log, flags=re.M))
    expected = STEPS[:4] + (["search"] if SHARED_CIFAR10.is_dir() else []) + STEPS[4:]
    assert list(ended) == expected, run.stdout + run.stderr
    failed = {name: rc for name, rc in ended.items() if rc != "0"}
    assert not failed, f"steps failed: {failed}\n" + log[-6000:]
    assert run.returncode == 0 and (tmp_path / "gpu_results.tar.gz").is_file()

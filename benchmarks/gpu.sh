#!/usr/bin/env bash
# The one-command GPU runbook: everything in this project that needs a CUDA device, in <= 9 minutes on an
# H100/H200, from an uninstalled checkout (the device image's own torch/triton; torch-pruning as a wheel in .whl/).
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # device tool: carry [".whl"], command `bash benchmarks/gpu.sh`
#
# Each step has its own time limit, so one slow or failing step cannot take the others' time; each writes its
# files as it goes (the sweep resumes). Everything lands in $OUT/gpu_results.tar.gz (the device tool returns at
# most 8 files) plus $OUT/runbook.log; unpack with `tar xzf gpu_results.tar.gz -C results/`.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
W=$(mktemp -d)/gpu
mkdir -p "$W"
LOG="$OUT/runbook.log"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export VITCOMPRESS_CACHE="$W/cache"
T0=$(date +%s)

step() {  # step NAME SECONDS CMD... : run with a limit, log its exit code and wall time
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s) at +$((t - T0))s: $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  pack
}
pack() { tar czf "$OUT/gpu_results.tar.gz.tmp" -C "$W/.." gpu && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/../site" .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$W/../site"
fi
{ date -u +%FT%TZ; nvidia-smi; $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton',
triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"; } >"$W/environment.txt" 2>&1
cat "$W/environment.txt" >>"$LOG"

step gpu-tests 90 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu.py --junitxml="$W/pytest_gpu.xml"
step tokens-speed 60 $PY -m vitcompress.bench.tokens --out "$W/tokens" --batch-sizes 1,64,256 --repeat 20
step quant-speed 70 $PY -m vitcompress.bench.quant --speed-only --out "$W/quant" --batch-sizes 1,64,256 --repeat 20
step prune-speed 50 $PY -m vitcompress.bench.prune --speed --no-accuracy --out "$W/prune" --batch-sizes 1,64,256
for part in gemm bsr attention; do  # one limit each: a slow autotune in one part leaves the others their time
  step "kernels-$part" 75 $PY -m vitcompress.bench.kernels --out "$W/kernels_$part" --repeat 30 --parts "$part"
done
parts=$(ls "$W"/kernels_*/kernels.json 2>/dev/null)
[ -n "$parts" ] && step kernels-merge 20 $PY -m vitcompress.bench.kernels --merge $parts --out "$W/kernels"
left=$(( ${BUDGET_S:-525} - ($(date +%s) - T0) )); [ "$left" -lt 30 ] && left=30
step sweep "$left" $PY -m vitcompress sweep recipes/vit_b16_gpu.yaml --out "$W/sweep"
echo "=== done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
pack

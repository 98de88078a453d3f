#!/usr/bin/env bash
# The one-command GPU runbook: everything in this project that needs a CUDA device, in <= 9 minutes on an
# H100/H200, from an uninstalled checkout (the device image's own torch/triton; torch-pruning as a wheel in .whl/).
#
#   OUT=/some/dir bash benchmarks/gpu.sh               # device tool: carry [".whl"], command `bash benchmarks/gpu.sh`
#   STEPS="tests kernels-gemm speed" OUT=... bash benchmarks/gpu.sh      # a subset (a short lease, a rerun)
#   STEPS=headline OUT=... bash benchmarks/gpu.sh       # the first call on any lent GPU (<= 6 minutes)
#   SMOKE=1 OUT=... bash benchmarks/gpu.sh              # the CPU smoke run (tests/test_runbook.py, every .ci/run)
#
# SMOKE=1 runs every step with the same scripts and flags on the CPU: a tiny ViT at 64 px, one batch size, one
# repeat, two points per sweep, Triton's interpreter for the kernels, torch.compile tracing each graph without
# generating code (VITCOMPRESS_COMPILE_BACKEND=aot_eager). It measures nothing; it makes a script or flag
# bug fail here instead of on the lent GPU, whose minutes do not come back.
#
# `headline` always runs first: it measures this GPU's GEMM table (python -m vitcompress.kernels.tune, into
# tuned/<arch>.json: commit it to vitcompress/kernels/tuned/), then times ViT-B/16 at batch 1 / 64 / 256, eager and compiled
# dense against every deployable method and the best stacks, compiled (benchmarks/headline.py), with the CIFAR-10
# accuracy that the CPU measured beforehand (results/headline/cifar10). Its compiles run in HEADLINE_JOBS (6)
# worker processes first, sharing one Inductor cache.
#
# Each step has its own time limit, so one slow or failing step cannot take the others' time; each writes its
# files as it goes (the sweep resumes). Everything lands in $OUT/gpu_results.tar.gz (the device tool returns at
# most 8 files) plus $OUT/runbook.log; unpack with `tar xzf gpu_results.tar.gz` into results/gpu/<device>_<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
STEPS=${STEPS:-"headline tests speed search kernels-gemm kernels-bsr kernels-attention sweep"}
W=$(mktemp -d)/gpu
mkdir -p "$W"
LOG="$OUT/runbook.log"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export VITCOMPRESS_CACHE="$W/cache" VITCOMPRESS_BENCH_WARMUP_S=${VITCOMPRESS_BENCH_WARMUP_S:-0.3}
export TORCHINDUCTOR_CACHE_DIR="$W/../inductor" TRITON_CACHE_DIR="$W/../triton"  # shared by the compile workers
T0=$(date +%s)

# Per-step extra arguments, appended after each step's own (argparse and the sweep take the last value given).
TUNE_X=(); HEADLINE_X=(); SPEED_X=(); SEARCH_X=(--target cuda --batch-size 64 --budget-minutes 2); KERNELS_X=()
SWEEP_X=()
if [ -n "${SMOKE:-}" ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" VITCOMPRESS_COMPILE_BACKEND=aot_eager  # traced, not code-generated
  TINY='{model: vit_tiny_patch16_224, kwargs: {img_size: 64}}'
  BENCH='{device: cpu, dtype: fp32, batch_sizes: [2], warmup: 0, warmup_s: 0, repeat: 1}'
  TUNE_X=(--smoke --repeat 1)
  HEADLINE_JOBS=1 HEADLINE_VARIANTS=${HEADLINE_VARIANTS:-"ToMe 0.59x (r=13 on ViT-B);W8A8 int8 static"}
  HEADLINE_X=(--device cpu --dtype fp32 --arch vit_tiny_patch16_224 --img-size 64 --batch-sizes 2 --repeat 1
              --dense-mode default --no-profile)
  SPEED_X=(--set "base=$TINY" --set "bench=$BENCH" --set reference_batch=2 --set dense=[] --set calib_size=4
           --only "W8A8 int8 static" --only "heads 25 %")
  SEARCH_X=(--target torch --batch-size 2 --budget-minutes 1 --n-trials 2 --heldout 64 --heldout-small 32
            --max-drop 5)
  KERNELS_X=(--smoke --repeat 1)
  SWEEP_X=(--set "base=$TINY" --set "speed_model=$TINY" --set "bench=$BENCH" --set reference_batch=2
           --set eval_limit=16 --set calib_size=4 --only "ToMe r=8" --only "W8A8 int8 (deploy)")
fi

pack() { tar czf "$OUT/gpu_results.tar.gz.tmp" -C "$W/.." gpu && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"; }
step() {  # step NAME SECONDS CMD... : run with a limit if NAME is in $STEPS; log its exit code and wall time
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s) at +$((t - T0))s: $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: rc=$? in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  pack
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/../site" .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$W/../site"
fi
{ date -u +%FT%TZ; git log -1 --format='commit %H' 2>/dev/null; nvidia-smi; $PY -c "import torch, triton, timm
print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
} >"$W/environment.txt" 2>&1
cat "$W/environment.txt" >>"$LOG"

# The headline first: the GEMM table (its own limit), then the compiled ViT-B/16 table; the table steers `auto`.
case " $STEPS " in *" headline "*) STEPS="$STEPS headline-table" ;; esac
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm{m}{n}')" 2>/dev/null || echo sm)
step headline-table "${TABLE_LIMIT:-75}" $PY -m vitcompress.kernels.tune --out "$W/tuned/$ARCH.json" --repeat 15 \
  "${TUNE_X[@]}"
[ -f "$W/tuned/$ARCH.json" ] && export VITCOMPRESS_GEMM_TABLE="$W/tuned/$ARCH.json"
step headline "${HEADLINE_LIMIT:-300}" $PY -m benchmarks.headline --out "$W/headline" \
  --jobs "${HEADLINE_JOBS:-6}" --repeat 20 --accuracy results/headline/cifar10 ${HEADLINE_VARIANTS:+--variants "$HEADLINE_VARIANTS"} \
  "${HEADLINE_X[@]}"

step tests "${TESTS_LIMIT:-100}" $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu.py \
  --junitxml="$W/pytest_gpu.xml" ${TESTS_K:+-k "$TESTS_K"}
# every family's speed on ViT-B/16 against eager and compiled dense: a speed-only sweep (it resumes if cut short)
step speed "${SPEED_LIMIT:-200}" $PY -m vitcompress sweep gpu_speed --out "$W/speed" "${SPEED_X[@]}"
# vitcompress search on the GPU: the fastest compiled + CUDA-graph stack of the CIFAR-10 testbed within 1 pt of
# agreement, held out (a top-1 drop of 1 pt is below two standard errors of 2,000 images at 73 %: refused)
SEARCH_DATA=${SEARCH_DATA:-../shared/data/cifar10}
if [ -d "$SEARCH_DATA" ]; then
  step search "${SEARCH_LIMIT:-150}" $PY -m vitcompress search results/cifar10/testbed --data "$SEARCH_DATA" \
    --metric agreement --max-drop 1.0 --out "$W/search" "${SEARCH_X[@]}"
fi
for part in gemm bsr attention; do  # one limit each: a slow autotune in one part leaves the others their time
  step "kernels-$part" "${KERNELS_LIMIT:-75}" $PY -m benchmarks.kernels --out "$W/kernels_$part" --repeat 20 --parts "$part" \
    "${KERNELS_X[@]}"
done
parts=$(ls "$W"/kernels_*/kernels.json 2>/dev/null | tr '\n' ' ')
if [ -n "$parts" ]; then STEPS="$STEPS kernels-merge" step kernels-merge 20 $PY -m benchmarks.kernels --merge $parts \
  --out "$W/kernels"; fi
left=$(( ${BUDGET_S:-525} - ($(date +%s) - T0) )); [ "$left" -lt 30 ] && left=30
step sweep "$left" $PY -m vitcompress sweep recipes/vit_b16_gpu.yaml --out "$W/sweep" "${SWEEP_X[@]}"
echo "=== done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
pack

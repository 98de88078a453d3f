#!/usr/bin/env bash
# The CPU checks of issue #17 on an AVX2-only x86 CPU (no AVX-512, no native bf16: AMD Zen 3, older Intel),
# *emulated* on a CPU that has more: every library that picks kernels by instruction set is capped at AVX2.
#   ATEN_CPU_CAPABILITY=avx2      torch's own vectorised kernels (elementwise, softmax, LayerNorm, ...)
#   ONEDNN_MAX_CPU_ISA=AVX2       oneDNN: fp32 / bf16 matmuls and the int8 quantized linear (no VNNI, no AVX-512)
#   MKL_ENABLE_INSTRUCTIONS=AVX2  MKL's fp32 GEMM
# bf16 then runs emulated (a bf16 matmul is ~25x slower than fp32 here), as on the real thing. What the caps do
# not change: the core's clock, caches and memory bandwidth, so absolute times are not a Zen 3's; the ratios are
# what this measures. Run it on a quiet machine (timings are side by side in one process, but 2 cores are few).
#
#   bash benchmarks/cpu_avx2.sh OUT [STEPS]     STEPS: any of "isa quant accuracy demo" (default: all)
set -euo pipefail
OUT=${1:?usage: bash benchmarks/cpu_avx2.sh OUT [STEPS]}
STEPS=${2:-isa quant accuracy demo}
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has isa; then  # what the caps give: the dispatch level, the dense dtype auto picks, one ViT-B-sized matmul
  python - "$OUT/isa.json" <<'EOF'
import json, os, statistics, sys, time
import torch
from vitcompress.bench.timing import Dtype, fastest_cpu_dtype
from vitcompress.io import atomic_write_json
from vitcompress.provenance import run_context

def ms(fn):
    fn()
    t = []
    for _ in range(5):
        s = time.perf_counter(); fn(); t.append(time.perf_counter() - s)
    return round(1000 * statistics.median(t), 2)

a, b = torch.randn(1576, 768), torch.randn(768, 768)
res = {"env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")},
       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "auto_dtype": str(Dtype.AUTO.on(torch.device("cpu"))),
       "fastest_cpu_dtype": str(fastest_cpu_dtype()), "matmul_1576x768x768_ms": {
           "fp32": ms(lambda: a @ b), "bf16": ms(lambda: a.bfloat16() @ b.bfloat16())}, **run_context()}
atomic_write_json(sys.argv[1], res)
print(json.dumps(res["matmul_1576x768x768_ms"]), "auto ->", res["auto_dtype"], flush=True)
EOF
fi

if has quant; then  # W8A8 deploy (oneDNN int8, 7-bit weights here) vs the fastest dense dtype, ViT-B/16, b1 / b16
  vitcompress sweep cpu_int8_speed --out "$OUT/int8_speed"
fi

if has accuracy; then  # the same int8 engine's accuracy: W8A8 deploy on the digits testbed, digits-c agreement
  B=$(python -c "from vitcompress.train import baseline; print(baseline())" | tail -1)
  for gran in per_tensor per_token; do
    vitcompress quantize "$B" --out "$WORK/w8a8_$gran" --mode deploy --a-granularity "$gran" --calib-data digits
    vitcompress eval "$WORK/w8a8_$gran" --data digits-c --no-speed --json "$OUT/w8a8_${gran}_digits_c.json"
  done
fi

if has demo; then  # `vitcompress demo` from an empty cache (it trains the digits testbed first)
  start=$(date +%s)
  VITCOMPRESS_CACHE="$WORK/cache" vitcompress demo --out "$WORK/demo" > "$OUT/demo.log" 2>&1
  echo "{\"demo_wall_s\": $(( $(date +%s) - start )), \"empty_cache\": true}" > "$OUT/demo_time.json"
  cp "$WORK/demo/report.md" "$OUT/demo_report.md"
  cat "$OUT/demo_time.json"
fi

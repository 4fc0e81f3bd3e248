#!/usr/bin/env bash
# One command for a fresh GPU machine: build the extension against the machine's torch, run the
# CUDA tests of the whole pipeline (kernels, explain end to end, the ONNX IO-binding path, the arch
# check), then the GPU benchmarks, and write logs and tables under $OUT. Exits non-zero when any
# build, test or benchmark step fails (each failure is named in $OUT/gpu_check.log).
# Budget: under 8 minutes on an H100/H200 (bench_speed is the long step: cut -k there first). Uses the machine's own Python (no package registry there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/json"
PY=${PYTHON:-python3}
export MEDCAM_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
failed=()
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }
# step NAME TIMEOUT CMD...: runs CMD with its output in $OUT/NAME.log; a failure is recorded, not fatal
step() {
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log"
  if [ $rc -ne 0 ]; then failed+=("$name (exit $rc)"); log "FAILED: $name (exit $rc)"; fi
  return $rc
}
table() {  # table SUITE TITLE: a markdown table from the suite's JSON, printed and kept
  $PY benchmarks/make_table.py "$1" "$OUT/json/$1_cuda.json" --title "$2" >"$OUT/$1_cuda.md" \
    && cat "$OUT/$1_cuda.md" || failed+=("table $1")
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch: nothing to check here (the CPU suite is make test)"
  exit 2
fi
log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
log "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())')"

rm -rf medcam_fast/_C*.so medcam_fast/_build_info.json
if ! step build 300 $PY -m pip install -v --no-build-isolation --no-deps -e .; then
  step build_inplace 300 $PY setup.py build_ext --inplace || { log "BUILD FAILED"; exit 1; }
fi
step build_info 60 $PY -c "import medcam_fast, json; i = medcam_fast.build_info(); print(json.dumps(i)); \
assert i['cuda_ops'], i" || exit 1
cp "$OUT/build_info.log" "$OUT/build_info.json"

# kernels on every device of the shared list, the build and arch checks, the pipeline on CUDA,
# the ONNX IO-binding path (CUDA and the CPU spy)
MEDCAM_FAST_REQUIRE_OPS=1 MEDCAM_FAST_REQUIRE_CUDA_OPS=1 step tests_cuda 240 \
  $PY -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_build.py tests/test_cuda_pipeline.py \
  tests/test_onnx.py tests/test_fit_step.py tests/test_amortised.py tests/test_known_evidence_suite.py tests/test_checks.py \
  -k "cuda or build or arch or io_binding or providers or clone or autocast or pipeline or sync or graph_break"

step bench_ops 200 $PY -m pytest -q benchmarks/bm_ops.py --bench-devices=cuda -p no:cacheprovider \
  -k "8-224 or 1-64 or 32-512" --benchmark-json="$OUT/json/ops_cuda.json" && table ops "Fused ops on CUDA"
step bench_unet 60 $PY -m pytest -q benchmarks/bm_unet.py --bench-devices=cuda -p no:cacheprovider \
  --benchmark-json="$OUT/json/unet_cuda.json" && table unet "Stacked U-Net batching on CUDA"
step bench_throughput 200 $PY -m pytest -q benchmarks/bm_throughput.py --bench-devices=cuda -p no:cacheprovider \
  -k "demo or resnet18" --benchmark-json="$OUT/json/throughput_cuda.json" && table throughput "Throughput on CUDA"
# the fit step's modes: eager / compiled / CUDA graphs x fp32 / bf16 x N = 1, 8, 32, ResNet-18 224² and the demo
# classifier (each compile ~20-40 s), then 16 concurrent clients through the service against one call at a time
step bench_speed 330 $PY -m pytest -q benchmarks/bm_speed.py --bench-devices=cuda --bench-full -p no:cacheprovider \
  -k "(fit_step and (resnet18 or eager)) or service" --benchmark-json="$OUT/json/speed_cuda.json" \
  && table speed "Fit-step modes and the service on CUDA"
# the one table: ResNet-18 224² two-sided and checked (alone, 64 per call), the amortised path, and the
# fit-step modes and the service from bench_speed's JSON (issue 29's targets)
step gpu_targets 150 $PY benchmarks/gpu_targets.py --device cuda --n 64 --speed-json "$OUT/json/speed_cuda.json" \
  --out "$OUT/gpu_targets" && cat "$OUT/gpu_targets.md"
step profile 60 $PY benchmarks/profile_explain.py --device cuda --model resnet18 --size 224 --steps 10 \
  --out "$OUT/profile_cuda.md" && head -40 "$OUT/profile_cuda.md"
# Ray Serve replicas sharing the GPU (1, 2, 4), when the machine has Ray (the [ray] extra); said, not skipped silently
if $PY -c "import ray" 2>/dev/null; then
  step serve_gpu 150 $PY benchmarks/distributed_throughput.py --gpu-replicas 1,2,4 --n 64 --out "$OUT/serve_gpu" \
    && cat "$OUT/serve_gpu.md"
else
  log "serve_gpu: not run (ray is not installed on this machine: pip install ray[serve,data])"
fi

if [ ${#failed[@]} -gt 0 ]; then
  log "done with failures: ${failed[*]}"
  exit 1
fi
log "done: every step passed"

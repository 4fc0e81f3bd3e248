#!/usr/bin/env bash
# One command for a fresh GPU machine (see DEVELOPERS.md): build the extension against the
# machine's torch, run the CUDA tests, then the GPU benchmarks, and write tables under $OUT.
# Budget: under 8 minutes on an H100. Uses the machine's own Python (no package registry there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MEDCAM_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
log "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())')"

log "build"
rm -rf medcam_fast/_C*.so medcam_fast/_build_info.json
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  log "pip editable build failed; trying setup.py build_ext --inplace"
  $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -c "import medcam_fast, json; i = medcam_fast.build_info(); print(json.dumps(i)); assert i['cuda_ops'], i" \
  | tee "$OUT/build_info.json" || { log "CUDA ops not loaded"; exit 1; }

log "CUDA tests"
MEDCAM_FAST_REQUIRE_OPS=1 MEDCAM_FAST_REQUIRE_CUDA_OPS=1 timeout 240 $PY -m pytest -q -x tests/test_ops.py tests/test_build.py \
  -k "cuda or build" -p no:cacheprovider >"$OUT/tests_cuda.log" 2>&1
status=$?
tail -5 "$OUT/tests_cuda.log"
log "CUDA tests exit $status"

log "GPU benchmarks"
mkdir -p "$OUT/json"
# the target (N=8, 224x224) plus the extremes; every compiled twin costs a compile, so not the full grid
timeout 200 $PY -m pytest -q benchmarks/bm_ops.py --bench-devices=cuda -p no:cacheprovider -k "8-224 or 1-64 or 32-512" \
  --benchmark-json="$OUT/json/ops_cuda.json" >"$OUT/bench_ops.log" 2>&1
$PY benchmarks/make_table.py ops "$OUT/json/ops_cuda.json" --title "Fused ops on CUDA" >"$OUT/ops_cuda.md" && cat "$OUT/ops_cuda.md"
timeout 60 $PY -m pytest -q benchmarks/bm_unet.py --bench-devices=cuda -p no:cacheprovider \
  --benchmark-json="$OUT/json/unet_cuda.json" >"$OUT/bench_unet.log" 2>&1
$PY benchmarks/make_table.py unet "$OUT/json/unet_cuda.json" --title "Stacked U-Net batching on CUDA" \
  >"$OUT/unet_cuda.md" && cat "$OUT/unet_cuda.md"
log "GPU explain throughput (resnet18 and the demo classifier) and profile"
timeout 200 $PY -m pytest -q benchmarks/bm_throughput.py --bench-devices=cuda -p no:cacheprovider \
  -k "demo or resnet18" --benchmark-json="$OUT/json/throughput_cuda.json" \
  >"$OUT/bench_throughput.log" 2>&1
$PY benchmarks/make_table.py throughput "$OUT/json/throughput_cuda.json" --title "Throughput on CUDA" \
  >"$OUT/throughput_cuda.md" && cat "$OUT/throughput_cuda.md"
timeout 60 $PY benchmarks/profile_explain.py --device cuda --model resnet18 --size 224 --out "$OUT/profile_cuda.md" \
  >"$OUT/profile.log" 2>&1 && head -40 "$OUT/profile_cuda.md"
log "done"
exit $status

# Set-up and checks. `make test` and `make demo` work on a fresh machine: they create .venv,
# install the pinned environment (requirements.txt), build the extension and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed
OUT    ?= demo_out
BENCH_JSON := benchmarks/results/json
DATA   ?= ../shared/data

.PHONY: all venv build test test-fast test-suite test-isa demo bench bench-ops bench-unet bench-explain bench-throughput bench-onnx bench-speed probe evaluate-tag tune-sufficiency tune-steps demo-explainer evaluate-amortised tag-explainer evaluate-tag-amortised known-evidence-cases known-evidence-suite known-evidence-loco necessary-maps-val two-sided-checks adaptive-checks-val throughput-targets audit-suite distributed-throughput fault-recovery clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	touch $@

venv: $(STAMP)

# -v shows the CMake configuration the build prints (compilers, CUDA on/off, archs, OpenMP).
build: $(STAMP)
	$(BIN)/pip install -v --no-build-isolation -e .
	$(BIN)/python -c "import medcam_fast; print('build_info:', medcam_fast.build_info())"

test: test-suite test-isa

test-suite: build
	MEDCAM_FAST_REQUIRE_OPS=1 $(BIN)/python -m pytest -q tests

# Every module's fast tests (the `slow` marker: over about 5 s here, or real data); CI runs `make test`.
test-fast: build
	MEDCAM_FAST_REQUIRE_OPS=1 $(BIN)/python -m pytest -q -m "not slow" tests

# The fit-outcome tests once more under every other CPU clone this machine runs, with torch's own
# kernels held to the same instruction set (ATen, oneDNN, MKL): an AVX2 or baseline x86-64 machine,
# emulated. The active clone's pass is test-suite's. Each ISA gets its own Inductor cache: the
# cache does not key on ATEN_CPU_CAPABILITY, and a kernel compiled under another one gave wrong
# values (avx2) or failed to compile (default) when reused.
FIT_TESTS := tests/test_explain.py tests/test_batching.py tests/test_ops.py -k "planted or batched or clones"
test-isa: build
	@isas=$$($(BIN)/python -c "from medcam_fast import ops; print(' '.join(ops.cpu_isas()[1:]))"); \
	echo "CPU clones beyond the active one: $${isas:-none}"; \
	for isa in $$isas; do \
	  case $$isa in \
	    avx2) aten=avx2; dnnl=AVX2; mkl=AVX2 ;; \
	    *) aten=default; dnnl=SSE41; mkl=SSE4_2 ;; \
	  esac; \
	  echo "== fit-outcome tests: clone $$isa, torch held to $$aten / oneDNN $$dnnl / MKL $$mkl"; \
	  TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-$$isa \
	  MEDCAM_FAST_CPU_ISA=$$isa ATEN_CPU_CAPABILITY=$$aten ONEDNN_MAX_CPU_ISA=$$dnnl MKL_ENABLE_INSTRUCTIONS=$$mkl \
	    MEDCAM_FAST_REQUIRE_OPS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(FIT_TESTS) || exit 1; \
	done

demo: build
	$(BIN)/medcam-fast demo --out $(OUT)

# The bundled amortised explainer of the demo classifier: brain_mri train split, figures on 32 val
# images (with the per-image fit for comparison). About 20 minutes on 2 CPU cores; resumable.
EXPLAINER := medcam_fast/zoo/weights/brain_mri_mobilenetv2_explainer.safetensors
demo-explainer: build
	mkdir -p build
	$(BIN)/medcam-fast train-explainer --model demo --input $(DATA)/brain_mri/split.csv --split train \
	  --out $(EXPLAINER) --steps 3000 --checkpoint build/demo_explainer.ckpt --val-input $(DATA)/brain_mri/split.csv \
	  --val-split val --val-n 32 --val-fit --device cpu

evaluate-amortised: build
	$(BIN)/python benchmarks/evaluate_amortised.py --data $(DATA)/brain_mri --n 100 --out benchmarks/results/amortised_brain_mri

# the tag benchmark's amortised rows: an explainer of the shortcut classifier (tagged train split),
# then the harness on 50 tag test cases, the per-image fit beside it
TAG_EXPLAINER := benchmarks/models/brain_mri_tag_mobilenetv2_explainer.safetensors
tag-explainer: build
	mkdir -p build
	$(BIN)/python benchmarks/train_tag_explainer.py --data $(DATA)/brain_mri --out $(TAG_EXPLAINER) \
	  --checkpoint build/tag_explainer.ckpt

evaluate-tag-amortised: build
	$(BIN)/python benchmarks/evaluate.py --dataset brain_mri_tag --data $(DATA)/brain_mri \
	  --classifier brain_mri_tag_mobilenetv2 --weights-dir benchmarks/models --n 50 --reference-images 0 \
	  --sanity-images 0 --judge-steps 0 --methods medcam,amortised,amortised+refine --explainer $(TAG_EXPLAINER) \
	  --out benchmarks/results/evaluation_brain_mri_tag_amortised

# The known-evidence suite (DATA: brain_mri/ and isic2018/). The cases' classifiers are committed in
# benchmarks/models; known-evidence-cases retrains any that is missing (and each recipe without its
# shortcut) and rewrites the oracle facts in their cards. known-evidence-suite: every method on every
# case, one image per call (benchmarks/results/known_evidence_suite.md); known-evidence-loco: Med-CAM
# settings chosen on the other cases' val cases, scored on each left-out case's test cases.
known-evidence-cases: build
	$(BIN)/python benchmarks/build_known_evidence.py --data $(DATA) --models benchmarks/models

known-evidence-suite: build
	$(BIN)/python benchmarks/known_evidence_suite.py --data $(DATA) --out benchmarks/results/known_evidence_suite

known-evidence-loco: build
	$(BIN)/python benchmarks/known_evidence_loco.py --data $(DATA) --out benchmarks/results/known_evidence_loco --n-val 8

# the necessary side's ranking maps compared on the suite's val cases (benchmarks/results/necessary_maps_val.md)
necessary-maps-val: build
	$(BIN)/python benchmarks/necessary_maps_val.py --data $(DATA)

# the two-sided default on clean brain MRI test images (ok shares) and its seconds per image beside
# occlusion at 128², in one process (benchmarks/results/two_sided_checks.md)
two-sided-checks: build
	$(BIN)/python benchmarks/two_sided_checks.py --data $(DATA)

# the adaptive checks against the full test on the suite's val cases and clean brain MRI val images
adaptive-checks-val: build
	$(BIN)/python benchmarks/adaptive_checks_val.py --data $(DATA)

# seconds per image of the default, the amortised path and (BASELINE=path) an older checkout, in one run
throughput-targets: build
	$(BIN)/python benchmarks/throughput_targets.py $(if $(BASELINE),--baseline $(BASELINE))

# issue 30: the audit on the suite's shortcut classifiers (test split), Ray against one process, fault costs
audit-suite: build
	$(BIN)/python benchmarks/audit_suite.py --data $(DATA) --out benchmarks/results/audit_suite
distributed-throughput: build
	$(BIN)/python benchmarks/distributed_throughput.py --out benchmarks/results/distributed_throughput
fault-recovery: build
	$(BIN)/python benchmarks/fault_recovery.py --out benchmarks/results/fault_recovery

# Timing tables on this machine (one torch job at a time: nothing else should run beside them).
# The brain_mri suites read the data folder DATA (make bench DATA=/path/to/data; passed on as
# MEDCAM_FAST_DATA) and the classifiers trained by
# benchmarks/train_classifier.py; they skip cleanly without them.
# $(call bench,suite,title,extra pytest args): run benchmarks/bm_<suite>.py, save its JSON, write the table
define bench
	mkdir -p $(BENCH_JSON)
	MEDCAM_FAST_DATA=$(DATA) $(BIN)/python -m pytest -q benchmarks/bm_$(1).py $(3) --benchmark-json=$(BENCH_JSON)/$(1)_cpu.json
	$(BIN)/python benchmarks/make_table.py $(1) $(BENCH_JSON)/$(1)_cpu.json --title "$(2)" > benchmarks/results/$(1)_cpu.md
endef

bench-ops: build
	$(call bench,ops,Fused ops on CPU,--bench-devices=cpu)

bench-unet: build
	$(call bench,unet,Stacked U-Net batching on CPU,--bench-devices=cpu)

bench-explain: build
	$(call bench,explain,Fast against reference Med-CAM on CPU)

bench-throughput: build
	$(call bench,throughput,Throughput on CPU,--bench-devices=cpu)

bench-onnx: build
	$(call bench,onnx,ONNX Runtime against torch on CPU,--bench-devices=cpu)

# the fit step's modes (--bench-full adds the compiled rows and ResNet-18 on CPU) and the service
bench-speed: build
	$(call bench,speed,Fit-step modes and the service on CPU,--bench-devices=cpu)

bench: bench-ops bench-unet bench-explain bench-throughput bench-onnx bench-speed

# Known evidence (brain_mri in DATA): the evidence probe of the demo classifier, then every method on
# the shortcut classifier's tag cases (benchmarks/models/brain_mri_tag_mobilenetv2, about an hour here).
probe: build
	$(BIN)/python benchmarks/evidence_probe.py --data $(DATA)/brain_mri --classifier brain_mri_mobilenetv2 \
	  --out benchmarks/results/evidence_probe_brain_mri_mobilenetv2

evaluate-tag: build
	$(BIN)/python benchmarks/evaluate.py --dataset brain_mri_tag --data $(DATA)/brain_mri \
	  --classifier brain_mri_tag_mobilenetv2 --weights-dir benchmarks/models --n 50 --reference-images 2 \
	  --sanity-images 0 --out benchmarks/results/evaluation_brain_mri_tag

# the sufficiency test's and the fit's defaults, on val known-evidence cases and val images only
tune-sufficiency: build
	$(BIN)/python benchmarks/tune_sufficiency.py --data $(DATA)/brain_mri --n-tag 20 --n-demo 6 \
	  --out benchmarks/results/tuning_sufficiency_val

# the step budget and the early-stopping rule, on the same val sets, batches of 8
tune-steps: build
	$(BIN)/python benchmarks/tune_steps.py --data $(DATA)/brain_mri --out benchmarks/results/tuning_steps_val

clean:
	rm -rf build medcam_fast/_C*.so medcam_fast/_build_info.json .pytest_cache

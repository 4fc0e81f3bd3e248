# Set-up and checks. `make test` and `make demo` work on a fresh machine: they create .venv,
# install the pinned environment (requirements.txt), build the extension and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed
OUT    ?= demo_out
BENCH_JSON := benchmarks/results/json

.PHONY: all venv build test demo bench bench-ops bench-explain bench-throughput bench-onnx clean

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

test: build
	MEDCAM_FAST_REQUIRE_OPS=1 $(BIN)/python -m pytest -q tests

demo: build
	$(BIN)/medcam-fast demo --out $(OUT)

# Timing tables on this machine (one torch job at a time: nothing else should run beside them).
# The brain_mri suites need ../shared/data (or MEDCAM_FAST_DATA) and the classifiers trained by
# benchmarks/train_classifier.py; they skip cleanly without them.
bench-ops: build
	mkdir -p $(BENCH_JSON)
	$(BIN)/python -m pytest -q benchmarks/bm_ops.py --bench-devices=cpu --benchmark-json=$(BENCH_JSON)/ops_cpu.json
	$(BIN)/python benchmarks/make_table.py ops $(BENCH_JSON)/ops_cpu.json --title "Fused ops on CPU" > benchmarks/results/ops_cpu.md

bench-explain: build
	mkdir -p $(BENCH_JSON)
	$(BIN)/python -m pytest -q benchmarks/bm_explain.py --benchmark-json=$(BENCH_JSON)/explain_cpu.json
	$(BIN)/python benchmarks/make_table.py explain $(BENCH_JSON)/explain_cpu.json --title "Fast against reference Med-CAM on CPU" > benchmarks/results/explain_cpu.md

bench-throughput: build
	mkdir -p $(BENCH_JSON)
	$(BIN)/python -m pytest -q benchmarks/bm_throughput.py --bench-devices=cpu --benchmark-json=$(BENCH_JSON)/throughput_cpu.json
	$(BIN)/python benchmarks/make_table.py throughput $(BENCH_JSON)/throughput_cpu.json --title "Throughput on CPU" > benchmarks/results/throughput_cpu.md

bench-onnx: build
	mkdir -p $(BENCH_JSON)
	$(BIN)/python -m pytest -q benchmarks/bm_onnx.py --bench-devices=cpu --benchmark-json=$(BENCH_JSON)/onnx_cpu.json
	$(BIN)/python benchmarks/make_table.py onnx $(BENCH_JSON)/onnx_cpu.json --title "ONNX Runtime against torch on CPU" > benchmarks/results/onnx_cpu.md

bench: bench-ops bench-explain bench-throughput bench-onnx

clean:
	rm -rf build medcam_fast/_C*.so medcam_fast/_build_info.json .pytest_cache

"""Frozen (no-grad) classifier forward: onnxruntime (OrtClassifier) against torch eager, batches 1, 8 and 64.

Models: the brain-MRI demo classifier (timm mobilenetv2_100, 1 channel, 3 classes, 128x128; the trained weights
from medcam_fast/zoo/weights when present, else the same spec with random init) and timm resnet18 (3 channels,
1000 classes, 224x224, random init). Each is exported once per session with export_classifier (dynamo exporter,
parity checked) into a tmp folder. ORT gets as many intra-op threads as torch has.

    pytest benchmarks/bm_onnx.py --benchmark-json=benchmarks/results/json/onnx_cpu.json
    python benchmarks/make_table.py onnx benchmarks/results/json/onnx_cpu.json > benchmarks/results/onnx_cpu.md

``--bench-quick``: the demo classifier at batch 1 only.
"""
import json
from pathlib import Path

import pytest
import torch

from medcam_fast.onnx import CUDA, OrtClassifier, export_classifier

from conftest import sync

BATCHES = [1, 8, 64]
IMPLS = ["torch", "ort"]
MODELS = ["brain_mri_mobilenetv2", "resnet18"]
WEIGHTS = Path(__file__).resolve().parents[1] / "medcam_fast" / "zoo" / "weights"
STAND_IN = {"arch": "mobilenetv2_100", "in_chans": 1, "num_classes": 3, "input_size": [1, 128, 128],
            "mean": [0.5], "std": [0.5]}


def _build(name: str):
    """(model, input channels, input size, where the weights came from)."""
    from medcam_fast.zoo.cards import build_model

    torch.manual_seed(0)
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False), 3, 224, "random"
    weights = WEIGHTS / f"{name}.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        spec = json.loads(weights.with_suffix(".json").read_text())["model"]
        model = build_model(spec)
        model.load_state_dict(load_file(str(weights)))
        source = "card"
    else:
        spec, model, source = STAND_IN, build_model(STAND_IN), "random"
    return model, int(spec["in_chans"]), int(spec["input_size"][-1]), source


class Exported:
    """Session cache: each model is built and exported on first use only."""

    def __init__(self, folder: Path):
        self.folder, self.cache = folder, {}

    def get(self, name: str) -> dict:
        if name not in self.cache:
            model, c, size, source = _build(name)
            model.eval().requires_grad_(False)
            report = export_classifier(model, torch.randn(2, c, size, size), self.folder / f"{name}.onnx")
            self.cache[name] = dict(model=model, size=size, chans=c, source=source, report=report)
        return self.cache[name]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("bm_onnx"))


def _rounds(n, size):
    return max(3, min(50, int(2e6 / (n * size * size))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("model_name", MODELS)
def test_frozen_forward(benchmark, bench_device, quick, exported, model_name, n, impl):
    if quick and (model_name != MODELS[0] or n > 1):
        pytest.skip("--bench-quick")
    e = exported.get(model_name)
    x = torch.randn(n, e["chans"], e["size"], e["size"], device=bench_device)
    threads = torch.get_num_threads()
    if impl == "ort":
        clf = OrtClassifier(e["report"].path, providers="cuda" if bench_device == "cuda" else "cpu",
                            intra_op_threads=threads)
        if bench_device == "cuda" and clf.providers[0] != CUDA:
            pytest.skip(f"onnxruntime has no working CUDA provider here ({clf.providers})")
        providers = clf.providers
        fn = clf
    else:
        model = e["model"].to(bench_device)
        providers = ["torch"]

        def fn(inp):
            with torch.inference_mode():
                return model(inp)

    def run():
        fn(x)
        sync(bench_device)

    run()  # warm up outside the timing (ORT allocates its arena and picks kernels on the first call)
    benchmark.group = f"onnx {model_name} {bench_device} N={n}"
    benchmark.extra_info.update(model=model_name, batch=n, impl=impl, device=bench_device, providers=providers,
                                size=e["size"], threads=threads, weights=e["source"],
                                exporter=e["report"].exporter, opset=e["report"].opset,
                                parity_max_abs_diff=e["report"].max_abs_diff)
    benchmark.pedantic(run, rounds=_rounds(n, e["size"]), warmup_rounds=2)

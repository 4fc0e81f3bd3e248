"""Explanations per second: batched fitting (N U-Nets at once, one classifier pass per step over
[e_1..e_N, e~_1..e~_N]) against one image at a time.

    pytest benchmarks/bm_throughput.py --benchmark-json=benchmarks/results/json/throughput_cpu.json
    python benchmarks/make_table.py throughput benchmarks/results/json/throughput_cpu.json > benchmarks/results/throughput_cpu.md

1. The demo classifier on its 8 bundled samples with the default config (early stopping on):
   one batched call against 8 single calls. This is the CPU target (batched >= 1.3x).
2. Per-step cost across model families (timm resnet18, mobilenetv2_100, convnext_atto,
   vit_tiny; random init, so a fixed step count with early stopping off): N images batched
   against the same N one at a time. Sizes and N are cut on CPU (``--bench-full`` for all).
"""
import time

import pytest
import timm
import torch

from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.data import samples
from medcam_fast.zoo import load_demo

from conftest import sync

FIXED = dict(steps=10, fit=dict(min_steps=10, check_every=10))
MODELS = {
    "resnet18": dict(model_name="resnet18"),
    "mobilenetv2_100": dict(model_name="mobilenetv2_100"),
    "convnext_atto": dict(model_name="convnext_atto"),
    "vit_tiny": dict(model_name="vit_tiny_patch16_224"),
}


def _grid(device, full):
    if device == "cuda" or full:
        return [(s, n) for s in (64, 128, 224) for n in (8, 32, 128)]
    return [(64, 8), (64, 32), (128, 8), (64, 128)]


def _explain_rate(explainer, x, batched, device):
    t0 = time.perf_counter()
    if batched:
        explainer(x)
    else:
        for i in range(x.shape[0]):
            explainer(x[i:i + 1])
    sync(device)
    return x.shape[0] / (time.perf_counter() - t0)


@pytest.mark.parametrize("mode", ["single", "batched"])
def test_demo_classifier(benchmark, bench_device, mode):
    model, prep, _ = load_demo()
    model.to(bench_device)
    x = torch.stack([prep(s.path) for s in samples()]).to(bench_device)
    explainer = Explainer(model, MedCAMConfig())
    out = {}
    benchmark.group = f"throughput demo {bench_device}"
    benchmark.pedantic(lambda: out.setdefault("rate", _explain_rate(explainer, x, mode == "batched", bench_device)),
                       rounds=1, iterations=1)
    benchmark.extra_info.update(kind="demo", model="brain_mri_mobilenetv2 (demo)", device=bench_device, size=128,
                                n=x.shape[0], mode=mode, per_second=out["rate"])


@pytest.mark.parametrize("mode", ["single", "batched"])
@pytest.mark.parametrize("grid_index", range(9))
@pytest.mark.parametrize("name", list(MODELS))
def test_model_families(benchmark, bench_device, request, name, grid_index, mode):
    grid = _grid(bench_device, request.config.getoption("--bench-full"))
    if grid_index >= len(grid):
        pytest.skip("not in this device's grid")
    size, n = grid[grid_index]
    kwargs = {"img_size": size} if name == "vit_tiny" else {}
    torch.manual_seed(0)
    model = timm.create_model(MODELS[name]["model_name"], pretrained=False, num_classes=3, **kwargs)
    model.eval().to(bench_device)
    x = torch.randn(n, 3, size, size, device=bench_device)
    explainer = Explainer(model, MedCAMConfig(**FIXED, max_batch=128))
    if mode == "single":
        x = x[: max(2, min(n, 8))]  # per-image cost is flat: time a few and report the rate
    out = {}
    benchmark.group = f"throughput {name} {bench_device} {size}x{size} N={n}"
    benchmark.pedantic(lambda: out.setdefault("rate", _explain_rate(explainer, x, mode == "batched", bench_device)),
                       rounds=1, iterations=1)
    benchmark.extra_info.update(kind="families", model=name, device=bench_device, size=size, n=n, mode=mode,
                                per_second=out["rate"], steps=FIXED["steps"])

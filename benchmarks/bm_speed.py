"""The fit step's modes and the screening service, timed:

    pytest benchmarks/bm_speed.py --benchmark-json=benchmarks/results/json/speed_cpu.json
    python benchmarks/make_table.py speed benchmarks/results/json/speed_cpu.json > benchmarks/results/speed_cpu.md

1. ``test_fit_step``: milliseconds per fit step (early stopping off, after a warm-up call that
   also compiles) of eager against ``torch.compile`` (and CUDA graphs, ``reduce-overhead``, on
   CUDA), fp32 against bf16 autocast, one image against a batch of 8, on the demo classifier at
   128² and a random-init ResNet-18 at 224². On CPU the compiled rows and ResNet-18 run with
   ``--bench-full`` only (each compile costs about a minute on 2 cores).
2. ``test_service``: 16 concurrent single-image clients (threads) through an ExplainerService
   against the same 16 requests served one call at a time, the demo classifier on its bundled
   samples (twice over), default config (early stopping on); batches of at most 8 or 16.
"""
import threading
import time

import pytest
import timm
import torch

from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.data import samples
from medcam_fast.medcam import explainer as explainer_mod
from medcam_fast.medcam.service import ExplainerService
from medcam_fast.zoo import load_demo

from conftest import sync

STEPS = 10
MODES = {  # name: config changes of the fit step
    "eager": dict(),
    "compiled": dict(compile=True),
    "cudagraphs": dict(compile=True, fit=dict(compile_mode="reduce-overhead")),
}


def _demo(device):
    model, prep, _ = load_demo()
    x = torch.stack([prep(s.path) for s in samples()])
    x = torch.cat([x] * 4)   # 32: the 8 samples four times over
    return model.to(device), x.to(device)


def _resnet18(device):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval().to(device)
    return model, torch.randn(32, 3, 224, 224, device=device)


MODELS = {"demo": _demo, "resnet18": _resnet18}


class _FitTimer:
    """Wall time of the fit alone (``Explainer._fit``), not the verification around it."""

    def __init__(self, device):
        self.device, self.seconds, self._orig = device, [], explainer_mod.Explainer._fit

    def __enter__(self):
        timer = self

        def timed(inner, *a, **k):
            t0 = time.perf_counter()
            out = timer._orig(inner, *a, **k)
            sync(timer.device)
            timer.seconds.append(time.perf_counter() - t0)
            return out

        explainer_mod.Explainer._fit = timed
        return self

    def __exit__(self, *exc):
        explainer_mod.Explainer._fit = self._orig


@pytest.mark.parametrize("n", [1, 8, 32])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fit_step(benchmark, bench_device, request, model_name, mode, precision, n):
    full = request.config.getoption("--bench-full")
    if mode == "cudagraphs" and bench_device != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if n == 32 and bench_device != "cuda":
        pytest.skip("N=32 on CUDA only")
    if bench_device == "cpu" and not full and (mode != "eager" or model_name != "demo"):
        pytest.skip("compiled and ResNet-18 rows on CPU: --bench-full")
    model, x = MODELS[model_name](bench_device)
    cfg = MedCAMConfig(steps=STEPS, amp=precision == "bf16", **MODES[mode], fit=dict(min_steps=STEPS, check_every=STEPS))
    explainer = Explainer(model, cfg)
    xs = x[:n]
    with _FitTimer(bench_device) as timer:
        explainer(xs)   # warm-up: allocator, autotuning, compilation
        compile_s = timer.seconds[-1]
        benchmark.group = f"fit step {model_name} {bench_device} N={n}"
        benchmark.pedantic(lambda: explainer(xs), rounds=3, iterations=1)
    per_step = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2] / STEPS
    benchmark.extra_info.update(kind="fit_step", model=model_name, device=bench_device, n=n, mode=mode,
                                precision=precision, ms_per_step=per_step * 1e3,
                                ms_per_image_step=per_step * 1e3 / n, first_call_s=compile_s,
                                size=int(x.shape[-1]))


def _serve_concurrently(service, images) -> list:
    out = [None] * len(images)
    start = threading.Barrier(len(images))

    def client(i):
        start.wait()
        out[i] = service.explain(images[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("mode", ["one_call_at_a_time", "service_8", "service_16"])
def test_service(benchmark, bench_device, mode):
    model, x = _demo(bench_device)
    images = list(x[:16])   # 16 requests: the 8 samples twice
    explainer = Explainer(model, MedCAMConfig())
    explainer(images[0][None])         # warm
    stats = {}

    def run():
        t0 = time.perf_counter()
        if mode.startswith("service"):
            with ExplainerService(explainer, max_batch=int(mode.split("_")[1]), window=0.1) as service:
                res = _serve_concurrently(service, images)
            stats["batches"] = [len(b.ids) for b in service.batches]
        else:
            res = [explainer(im[None]) for im in images]
        sync(bench_device)
        stats["seconds"] = time.perf_counter() - t0
        stats["ok"] = sum(r.status[0] == "ok" for r in res)
        stats["area"] = float(sum(float(r.area[0]) for r in res) / len(res))

    benchmark.group = f"service demo {bench_device} 16 clients"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(kind="service", model="demo", device=bench_device, size=128, n=len(images), mode=mode,
                                per_second=len(images) / stats["seconds"], batches=stats.get("batches"),
                                status_ok=stats["ok"], mean_area=stats["area"])

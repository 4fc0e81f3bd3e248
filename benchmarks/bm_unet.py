"""How N per-image U-Nets run together: grouped convolutions, a Python loop of ordinary convolutions,
or torch.func.vmap over the stacked weights (``MedCAMConfig.unet_batching``). One U-Net step, forward
plus backward through the fast default U-Net (widths 16-32-64, 1/2 resolution, bilinear up).

    pytest benchmarks/bm_unet.py --benchmark-json=benchmarks/results/json/unet_cpu.json
    python benchmarks/make_table.py unet benchmarks/results/json/unet_cpu.json > benchmarks/results/unet_cpu.md
"""
import pytest
import torch

from medcam_fast import MedCAMConfig
from medcam_fast.medcam.unet import StackedUNet

from conftest import sync

BATCHINGS = ["grouped", "loop", "vmap"]


def _grid(device, full):
    if device == "cuda" or full:
        return [(s, n) for s in (64, 128, 224) for n in (8, 32, 128)]
    return [(64, 8), (128, 8), (128, 32)]


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("grid_index", range(9))
def test_unet_step(benchmark, bench_device, request, grid_index, batching):
    grid = _grid(bench_device, request.config.getoption("--bench-full"))
    if grid_index >= len(grid):
        pytest.skip("not in this device's grid")
    size, n = grid[grid_index]
    cfg = MedCAMConfig(fit=dict(unet_batching=batching))
    unet = StackedUNet.from_config(cfg, n, 1, device=torch.device(bench_device), size=(size, size)).requires_grad_()
    x = torch.randn(n, 1, size, size, device=bench_device)

    def step():
        unet(x).sigmoid().mean().backward()
        sync(bench_device)

    step()  # warm-up (allocator, vmap tracing)
    benchmark.group = f"unet {bench_device} {size}x{size} N={n}"
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info.update(kind="unet", device=bench_device, size=size, n=n, batching=batching)

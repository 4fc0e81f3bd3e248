"""Forward + backward of the fused ops against their naive twins, eager and under torch.compile.

    pytest benchmarks/bm_ops.py --benchmark-json=benchmarks/results/ops_cpu.json
    python benchmarks/make_table.py ops benchmarks/results/ops_cpu.json > benchmarks/results/ops_cpu.md
"""
import pytest
import torch

from medcam_fast import ops
from medcam_fast.ops import naive

from conftest import sync

BATCHES = [1, 8, 32]
SIZES = [64, 224, 512]
IMPLS = ["fused", "naive", "naive_compiled"]


def _priors_fns():
    fused = lambda m: ops.mask_priors(m, diagonal=True)  # noqa: E731
    twin = lambda m: naive.mask_priors(m, diagonal=True)  # noqa: E731
    return {"fused": fused, "naive": twin, "naive_compiled": torch.compile(twin, dynamic=False)}


def _compose_fns():
    return {"fused": ops.compose, "naive": naive.compose,
            "naive_compiled": torch.compile(naive.compose, dynamic=False)}


def _rounds(n, size):
    work = n * size * size
    return max(3, min(50, int(4e7 / work)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", BATCHES)
def test_mask_priors(benchmark, bench_device, quick, n, size, impl):
    if quick and (size > 64 or n > 8):
        pytest.skip("--bench-quick")
    torch._dynamo.reset()
    fn = _priors_fns()[impl]
    m = torch.rand(n, 1, size, size, device=bench_device, requires_grad=True)
    g = torch.randn(n, 3, device=bench_device)

    def run():
        m.grad = None
        fn(m).backward(g)
        sync(bench_device)

    run()  # compile / warm up outside the timing
    benchmark.group = f"mask_priors {bench_device} N={n} {size}x{size}"
    benchmark.extra_info.update(op="mask_priors", device=bench_device, n=n, size=size, impl=impl)
    benchmark.pedantic(run, rounds=_rounds(n, size), warmup_rounds=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", BATCHES)
def test_compose(benchmark, bench_device, quick, n, size, impl):
    if quick and (size > 64 or n > 8):
        pytest.skip("--bench-quick")
    torch._dynamo.reset()
    fn = _compose_fns()[impl]
    x = torch.randn(n, 3, size, size, device=bench_device)
    bg = torch.randn_like(x)
    m = torch.rand(n, 1, size, size, device=bench_device, requires_grad=True)
    baseline = torch.zeros(1, 3, 1, 1, device=bench_device)
    g = torch.randn(2 * n, 3, size, size, device=bench_device)

    def run():
        m.grad = None
        fn(x, m, baseline, bg).backward(g)
        sync(bench_device)

    run()
    benchmark.group = f"compose {bench_device} N={n} {size}x{size}"
    benchmark.extra_info.update(op="compose", device=bench_device, n=n, size=size, impl=impl)
    benchmark.pedantic(run, rounds=_rounds(n, size), warmup_rounds=2)

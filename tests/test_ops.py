"""The fused ops against their naive twins: values, gradients, tracing, odd shapes, bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch

import medcam_fast
from medcam_fast import ops
from medcam_fast.ops import naive

from _testing import devices, float_dtypes, half_dtypes, tol

needs_ext = pytest.mark.skipif(not medcam_fast.build_info()["cpu_ops"], reason="extension not built")
all_dtypes = float_dtypes + half_dtypes
shapes = [(2, 1, 17, 23), (3, 1, 1, 1), (2, 1, 1, 9), (2, 1, 9, 1), (1, 1, 2, 2), (2, 1, 40, 3)]


def _skip_unsupported(device, dtype):
    if device.type == "cpu" and dtype == torch.float16 and not torch.backends.mkldnn.is_available():
        pytest.skip("float16 on this CPU")


def _mask(shape, device, dtype, logits=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64) * 2 if logits else torch.rand(shape, generator=g,
                                                                                               dtype=torch.float64)
    return m.to(device=device, dtype=dtype)


def _compose_inputs(n, c, h, w, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, bg = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) for _ in range(2))
    m = torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, m, bg)]


# ---------------------------------------------------------------- mask_priors


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", all_dtypes, ids=str)
@pytest.mark.parametrize("shape", shapes, ids=str)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_mask_priors_forward_backward_match_naive(device, dtype, shape, diagonal, logits):
    _skip_unsupported(device, dtype)
    m = _mask(shape, device, dtype, logits).requires_grad_()
    out = ops.mask_priors(m, diagonal=diagonal, logits=logits, temperature=0.7)
    assert out.shape == (shape[0], 3) and out.dtype == dtype
    # the twin runs in float64 on the same values: an exact reference for every dtype
    m_ref = m.detach().double().requires_grad_()
    ref = naive.mask_priors(m_ref, diagonal=diagonal, logits=logits, temperature=0.7)
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    w = torch.tensor([[0.3, -1.2, 0.8]], dtype=torch.float64).expand(shape[0], 3)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(m.grad.double(), m_ref.grad, **tol(dtype))


@pytest.mark.parametrize("device", devices, ids=str)
def test_mask_priors_known_values(device):
    # a 2x2 mask [[1,0],[0,1]]: area 1/2, bin 0, tv = 2 pairs of 1 per direction -> 1 + 1
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], device=device, dtype=torch.float64)
    torch.testing.assert_close(ops.mask_priors(m).cpu(), torch.tensor([[0.5, 0.0, 2.0]], dtype=torch.float64))
    # diagonal pairs: (0,0)-(1,1) equal, (0,1)-(1,0) equal -> adds 0
    torch.testing.assert_close(ops.mask_priors(m, diagonal=True).cpu(), torch.tensor([[0.5, 0.0, 2.0]],
                                                                                    dtype=torch.float64))
    # constant 0.5: bin = 0.25, tv = 0; a 1x1 mask has no pairs, tv 0
    half = torch.full((1, 1, 4, 4), 0.5, device=device, dtype=torch.float64)
    torch.testing.assert_close(ops.mask_priors(half, diagonal=True).cpu(), torch.tensor([[0.5, 0.25, 0.0]],
                                                                                        dtype=torch.float64))
    # a single vertical edge in a 3x3: anti-diagonal and diagonal pairs each see 2 of 4 differ
    edge = torch.tensor([[[[0.0, 1.0, 1.0]] * 3]], device=device, dtype=torch.float64)
    expect_tv = 0 + 3 / 6 + (2 / 4 + 2 / 4) / math.sqrt(2)
    torch.testing.assert_close(ops.mask_priors(edge, diagonal=True)[0, 2].item(), expect_tv)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_mask_priors_gradcheck(device, diagonal, logits):
    m = _mask((2, 1, 6, 5), device, torch.float64, logits, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.mask_priors(t, diagonal=diagonal, logits=logits,
                                                              temperature=1.3), (m,))


@needs_ext
@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mask_priors_opcheck(device, dtype):
    m = _mask((2, 1, 7, 5), device, dtype).requires_grad_()
    torch.library.opcheck(torch.ops.medcam_fast.mask_priors.default, (m, True, False, 1.0))
    torch.library.opcheck(torch.ops.medcam_fast.mask_priors.default, (m, False, True, 0.5))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last"])
def test_mask_priors_strided_inputs(device, layout):
    base = _mask((2, 1, 12, 16), device, torch.float32)
    m = base[:, :, :, ::2] if layout == "non_contiguous" else base.contiguous(memory_format=torch.channels_last)
    m = m.detach().requires_grad_()
    out = ops.mask_priors(m, diagonal=True)
    ref_in = m.detach().clone().requires_grad_()
    ref = naive.mask_priors(ref_in, diagonal=True)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(m.grad, ref_in.grad, **tol(torch.float32))


@pytest.mark.parametrize("device", devices, ids=str)
def test_mask_priors_empty_batch(device):
    m = torch.rand(0, 1, 8, 8, device=device, requires_grad=True)
    out = ops.mask_priors(m)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert m.grad.shape == m.shape


@pytest.mark.parametrize("device", devices, ids=str)
def test_mask_priors_nan_stays_in_its_sample(device):
    m = _mask((3, 1, 6, 6), device, torch.float32)
    m[1, 0, 2, 3] = float("nan")
    out = ops.mask_priors(m, diagonal=True)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(out[[0, 2]], naive.mask_priors(m[[0, 2]], diagonal=True), **tol(torch.float32))


@pytest.mark.parametrize("bad, match", [
    (lambda d: torch.rand(4, 4, device=d), "m must be"),
    (lambda d: torch.rand(1, 2, 4, 4, device=d), r"m must be \[N,1,H,W\]"),
    (lambda d: torch.rand(1, 1, 0, 4, device=d), "m must have H, W >= 1"),
    (lambda d: torch.ones(1, 1, 4, 4, dtype=torch.int64, device=d), "m must be a floating tensor"),
    (lambda d: [[0.5]], "m must be a torch.Tensor"),
])
@pytest.mark.parametrize("device", devices, ids=str)
def test_mask_priors_bad_input(device, bad, match):
    with pytest.raises(ValueError, match=match):
        ops.mask_priors(bad(device))


def test_mask_priors_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        ops.mask_priors(torch.rand(1, 1, 3, 3), logits=True, temperature=0.0)


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", all_dtypes, ids=str)
@pytest.mark.parametrize("baseline_kind", ["number", "per_channel", "c11", "1c11", "full"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 1, 1, 1), (2, 3, 1, 7), (3, 1, 5, 1)], ids=str)
def test_compose_forward_backward_match_naive(device, dtype, baseline_kind, shape):
    _skip_unsupported(device, dtype)
    n, c, h, w = shape
    x, m, bg = _compose_inputs(n, c, h, w, device, dtype)
    per_c = torch.linspace(-1, 1, c, dtype=torch.float64)
    baseline = {
        "number": -0.25,
        "per_channel": per_c.to(device, dtype),
        "c11": per_c.view(c, 1, 1).to(device, dtype),
        "1c11": per_c.view(1, c, 1, 1).to(device, dtype),
        "full": torch.randn(n, c, h, w, dtype=torch.float64).to(device, dtype),
    }[baseline_kind]
    x.requires_grad_()
    m.requires_grad_()
    out = ops.compose(x, m, baseline, bg)
    assert out.shape == (2 * n, c, h, w) and out.dtype == dtype
    b_ref = per_c.view(1, c, 1, 1) if baseline_kind == "per_channel" else baseline
    b_ref = b_ref.double() if torch.is_tensor(b_ref) else b_ref
    xr, mr = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = naive.compose(xr, mr, b_ref if not torch.is_tensor(b_ref) else b_ref.to(device), bg.double())
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    gout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    (out.double() * gout).sum().backward()
    (ref * gout).sum().backward()
    # dm sums C*2 products: allow C times the per-element tolerance
    t = {k: v * max(c, 1) * 2 for k, v in tol(dtype).items()}
    torch.testing.assert_close(m.grad.double(), mr.grad, **t)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol(dtype))


@pytest.mark.parametrize("device", devices, ids=str)
def test_compose_gradcheck(device):
    x, m, bg = _compose_inputs(2, 3, 5, 4, device, torch.float64, seed=2)
    b = torch.randn(3, dtype=torch.float64, device=device)
    for t in (x, m, bg, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(ops.compose, (x, m, b, bg))
    full = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ops.compose, (x, m, full, bg))


@pytest.mark.parametrize("device", devices, ids=str)
def test_compose_no_grad_x(device):
    x, m, bg = _compose_inputs(2, 3, 5, 4, device, torch.float32)
    m.requires_grad_()
    ops.compose(x, m, 0.0, bg).sum().backward()
    assert x.grad is None and m.grad is not None


@needs_ext
@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compose_opcheck(device, dtype):
    x, m, bg = _compose_inputs(2, 3, 6, 5, device, dtype)
    b = torch.randn(3, device=device, dtype=dtype)
    x.requires_grad_()
    m.requires_grad_()
    torch.library.opcheck(torch.ops.medcam_fast.compose.default, (x, m, b, bg))
    torch.library.opcheck(torch.ops.medcam_fast.compose.default, (x.detach(), m, bg.clone(), bg))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last"])
def test_compose_strided_inputs(device, layout):
    x, m, bg = _compose_inputs(2, 3, 8, 12, device, torch.float32)
    if layout == "channels_last":
        x, bg = (t.contiguous(memory_format=torch.channels_last) for t in (x, bg))
        m = m.contiguous(memory_format=torch.channels_last)
    else:
        x, bg, m = x[..., ::2], bg[..., ::2], m[..., ::2]
    m = m.detach().requires_grad_()
    out = ops.compose(x, m, 0.5, bg)
    mr = m.detach().clone().requires_grad_()
    ref = naive.compose(x, mr, 0.5, bg)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(m.grad, mr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices, ids=str)
def test_compose_empty_batch(device):
    x = torch.rand(0, 3, 4, 4, device=device)
    m = torch.rand(0, 1, 4, 4, device=device, requires_grad=True)
    out = ops.compose(x, m, 0.0, x.clone())
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert m.grad.shape == m.shape


@pytest.mark.parametrize("device", devices, ids=str)
def test_compose_nan_is_elementwise(device):
    x, m, bg = _compose_inputs(2, 2, 4, 4, device, torch.float32)
    x[0, 1, 2, 2] = float("nan")
    m[0, 0, 2, 2] = 0.0  # even a zero mask does not hide a NaN in x: 0 * nan = nan
    out = ops.compose(x, m, 0.0, bg)
    nan = torch.isnan(out)
    assert nan.sum() == 2 and nan[0, 1, 2, 2] and nan[2, 1, 2, 2]
    torch.testing.assert_close(out, naive.compose(x, m, 0.0, bg), equal_nan=True)


def _good(device):
    x, m, bg = _compose_inputs(2, 3, 4, 5, device, torch.float32)
    return dict(x=x, m=m, baseline=0.0, background=bg)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(x=a["x"][0]), "x must be"),
    (lambda a: a.update(x=a["x"].long()), "x must be a floating"),
    (lambda a: a.update(m=a["m"][:, :, :3]), "m must be"),
    (lambda a: a.update(m=a["m"].repeat(1, 2, 1, 1)), "m must be"),
    (lambda a: a.update(m=a["m"].double()), "m must have x's dtype"),
    (lambda a: a.update(background=a["background"][:1]), "background must have x's shape"),
    (lambda a: a.update(background=a["background"].half()), "background must have x's dtype"),
    (lambda a: a.update(baseline=torch.zeros(2)), "baseline of shape"),
    (lambda a: a.update(baseline=torch.zeros(3, 4, 4)), "baseline of shape"),
    (lambda a: a.update(baseline=torch.zeros(3, dtype=torch.float64)), "baseline must have x's dtype"),
    (lambda a: a.update(baseline="zero"), "baseline must be a torch.Tensor"),
])
def test_compose_bad_input(device, change, match):
    args = _good(device)
    change(args)
    with pytest.raises(ValueError, match=match):
        ops.compose(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_device_mismatch():
    args = _good(torch.device("cpu"))
    args["m"] = args["m"].cuda()
    with pytest.raises(ValueError, match="m is on"):
        ops.compose(**args)


# ---------------------------------------------------------------- autocast and torch.compile


@pytest.mark.parametrize("device", devices, ids=str)
def test_autocast_policy(device):
    # Under autocast a bf16 mask meets a float32 image: compose computes in float32 and returns
    # x's dtype, mask_priors (a reduction) returns float32. Without the autocast registrations the
    # kernels refuse the mixed dtypes and mask_priors returns bf16: this test then fails.
    x, m32, bg = _compose_inputs(2, 3, 8, 8, device, torch.float32)
    m16 = m32.bfloat16()
    logits16 = _mask((2, 1, 8, 8), device, torch.bfloat16, logits=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        e = ops.compose(x, m16.requires_grad_(), 0.0, bg.bfloat16())
        p = ops.mask_priors(logits16, diagonal=True, logits=True)
    assert e.dtype == torch.float32 and p.dtype == torch.float32
    torch.testing.assert_close(e, naive.compose(x, m16.detach().float(), 0.0, bg.bfloat16().float()),
                               **tol(torch.float32))
    torch.testing.assert_close(p, naive.mask_priors(logits16.float(), diagonal=True, logits=True),
                               **tol(torch.float32))
    e.sum().backward()
    assert m16.grad is not None and m16.grad.dtype == torch.bfloat16
    # outside autocast mixed dtypes are an error, not a silent cast
    with pytest.raises(ValueError, match="dtype"):
        ops.compose(x, m16.detach(), 0.0, bg)


# ---------------------------------------------------------------- CPU clones


cpu_isas = ops.cpu_isas()
clone_sizes = [64, 128, 256, 512]


@needs_ext
def test_cpu_clones_reported_and_settable():
    assert cpu_isas and cpu_isas[-1] in ("scalar", "generic") and ops.cpu_isa() in cpu_isas
    assert medcam_fast.build_info()["cpu_isas"] == cpu_isas
    for isa in cpu_isas:
        with ops.forced_cpu_isa(isa):
            assert ops.cpu_isa() == isa and medcam_fast.build_info()["cpu_isa"] == isa
    with pytest.raises(ValueError, match="unknown CPU clone"):
        ops.set_cpu_isa("sse9")
    missing = [isa for isa in ("avx512", "avx2") if isa not in cpu_isas]
    for isa in missing:  # a clone the CPU lacks is refused, never run
        with pytest.raises(ValueError, match="not supported"):
            ops.set_cpu_isa(isa)


def test_bad_cpu_isa_env_fails_loudly():
    code = "import medcam_fast, torch; torch.ops.medcam_fast"
    env = {**os.environ, "MEDCAM_FAST_CPU_ISA": "sse9"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if medcam_fast.build_info()["cpu_ops"]:
        assert run.returncode != 0 and "MEDCAM_FAST_CPU_ISA='sse9'" in run.stderr


def _run_both_ops(h, dtype, seed):
    """Forward and backward of both ops at h x h: a tuple of tensors to compare across clones."""
    x, m, bg = _compose_inputs(3, 3, h, h, torch.device("cpu"), dtype, seed)
    logits = _mask((3, 1, h, h), torch.device("cpu"), dtype, logits=True, seed=seed)
    m.requires_grad_()
    logits.requires_grad_()
    e = ops.compose(x, m, 0.25, bg)
    e_full = ops.compose(x, m, bg.flip(0), bg)            # a full [N,C,H,W] baseline: the other loop
    pri = ops.mask_priors(logits, diagonal=True, logits=True)
    pri_m = ops.mask_priors(m, diagonal=False)
    g = torch.Generator().manual_seed(seed + 1)
    loss = (e * torch.randn(e.shape, generator=g, dtype=dtype)).sum() + (e_full * 0.5).sum() \
        + (pri * torch.tensor([0.3, -1.2, 0.8], dtype=dtype)).sum() + pri_m.sum()
    loss.backward()
    return e.detach(), e_full.detach(), pri.detach(), pri_m.detach(), m.grad, logits.grad


@needs_ext
@pytest.mark.skipif(len(cpu_isas) < 2, reason="this CPU runs one clone only")
@pytest.mark.parametrize("h", clone_sizes)
@pytest.mark.parametrize("dtype", float_dtypes, ids=str)
def test_cpu_clones_agree(h, dtype):
    # Every clone this CPU supports gives the same bits (no FMA contraction, fixed summation
    # order), forward and backward; the stated bound is 1e-6 relative, this asserts equality.
    results = {}
    for isa in cpu_isas:
        with ops.forced_cpu_isa(isa):
            results[isa] = _run_both_ops(h, dtype, seed=h)
    best = results[cpu_isas[0]]
    for isa in cpu_isas[1:]:
        for a, b in zip(best, results[isa]):
            assert torch.equal(a, b), (isa, (a - b).abs().max().item())
    # and each clone is right, not just alike: the twin in float64
    x, m, bg = _compose_inputs(3, 3, h, h, torch.device("cpu"), dtype, h)
    torch.testing.assert_close(best[0].double(), naive.compose(x.double(), m.double(), 0.25, bg.double()),
                               **tol(dtype))


def _loss(x, logits_m, bg):
    m = torch.sigmoid(logits_m)
    pri = ops.mask_priors(logits_m, diagonal=True, logits=True)
    e = ops.compose(x, m, 0.1, bg)
    return pri.sum() + e.square().mean()


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(device, backend):
    torch._dynamo.reset()
    x, _, bg = _compose_inputs(2, 3, 16, 16, device, torch.float32)
    lm = _mask((2, 1, 16, 16), device, torch.float32, logits=True)
    lm_c = lm.clone().requires_grad_()
    lm_e = lm.clone().requires_grad_()
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    out_c = compiled(x, lm_c, bg)
    out_e = _loss(x, lm_e, bg)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm_c.grad, lm_e.grad, atol=1e-5, rtol=1e-5)

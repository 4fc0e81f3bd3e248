"""Batched fitting: N independent U-Nets at once match one-by-one fitting; out-of-memory halving;
concurrent calls from threads."""
import threading

import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig

from medcam_fast.medcam import explainer as explainer_mod

from planted import make_planted, train_tiny_cnn

CFG = MedCAMConfig(steps=60, min_steps=20, check_every=10, batch_as_reference=False)


@pytest.fixture(scope="module")
def setup():
    model = train_tiny_cnn(seed=0)
    x, _, _ = make_planted(4, seed=21, positive_only=True)
    xr, yr, _ = make_planted(48, seed=22)
    return model, x, xr[yr == 0][:12]


def _same(a, b, tol_area=0.02, min_iou=0.7):
    """Stated tolerance: same label and kept, area within 2 points, mask IoU >= 0.7. Grouped and
    single convolutions (and classifier batches of other sizes) sum in other orders; the float32
    rounding differences then grow over the fit, where a pixel's soft value sits near its random
    threshold, so masks agree closely but not bit for bit."""
    assert torch.equal(a.label, b.label)
    assert torch.equal(a.kept, b.kept)
    assert (a.area - b.area).abs().max() <= tol_area
    inter = (a.mask & b.mask).flatten(1).sum(1).float()
    union = (a.mask | b.mask).flatten(1).sum(1).float().clamp(min=1)
    assert (inter / union).min() >= min_iou


def test_batched_matches_one_by_one(setup):
    # tolerance: grouped convolutions may sum in another order than single ones (float32 rounding)
    model, x, ref = setup
    ex = Explainer(model, CFG, reference=ref)
    batched = ex(x, seed=3)
    singles = [ex(x[i:i + 1], seed=3) for i in range(x.shape[0])]
    for i, one in enumerate(singles):
        row = type(batched)(**{k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in vars(batched).items()})
        _same(row, one)
        # each image stops on its own: within one check window of its one-by-one stop
        assert abs(int(batched.steps[i]) - int(one.steps[0])) <= CFG.check_every


def test_out_of_memory_halves_and_keeps_order(setup, monkeypatch):
    model, x, ref = setup
    ex = Explainer(model, CFG.replace(max_batch=4), reference=ref)
    expect = ex(x, seed=3)
    real, sizes = explainer_mod.fit_fast, []

    def flaky(clf, xs, *args, **kwargs):
        sizes.append(xs.shape[0])
        if xs.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(clf, xs, *args, **kwargs)

    monkeypatch.setattr(explainer_mod, "fit_fast", flaky)
    with pytest.warns(RuntimeWarning, match="halving"):
        got = ex(x, seed=3)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    _same(got, expect)


def test_other_errors_are_not_swallowed(setup, monkeypatch):
    model, x, ref = setup

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch somewhere")

    monkeypatch.setattr(explainer_mod, "fit_fast", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Explainer(model, CFG, reference=ref)(x)


def test_concurrent_calls_from_threads(setup):
    model, x, ref = setup
    ex = Explainer(model, CFG.replace(steps=30, min_steps=10), reference=ref)
    expect = [ex(x[i:i + 1], seed=i) for i in range(4)]
    got, errors = {}, []

    def work(i):
        try:
            got[i] = ex(x[i:i + 1], seed=i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        _same(got[i], expect[i], tol_area=0.0, min_iou=1.0)  # same shapes: bitwise equal
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_bf16_autocast_path_runs(setup):
    # amp=True on CPU exercises the autocast path (the ops' fp32 policy, fp32 losses); CUDA uses it by default
    model, x, ref = setup
    res = Explainer(model, CFG.replace(steps=20, min_steps=10, amp=True), reference=ref)(x[:1])
    assert res.mask.shape == (1, 64, 64) and res.kept.dtype == torch.bool
    assert torch.isfinite(res.soft_mask).all()


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_unet_batchings_agree(upsample):
    # grouped convolutions, a loop of single ones and vmap are three ways to run the same N networks
    from medcam_fast.medcam.unet import StackedUNet

    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    outs, grads = {}, {}
    for batching in ("grouped", "loop", "vmap"):
        unet = StackedUNet(3, 2, (8, 16), 2, 0.0, 0, torch.device("cpu"), torch.float32, 0.0, 3.0, batching,
                           upsample, 1.0).requires_grad_()
        out = unet(x)
        out.sigmoid().pow(2).mean().backward()
        outs[batching], grads[batching] = out.detach(), [p.grad.clone() for p in unet.parameters()]
    for batching in ("loop", "vmap"):
        assert torch.allclose(outs[batching], outs["grouped"], atol=1e-5), batching
        for g, ref in zip(grads[batching], grads["grouped"]):
            assert torch.allclose(g, ref, atol=1e-6, rtol=1e-4), batching

"""The fit step (medcam/step.py): no graph break under torch.compile(fullgraph=True) on the real
step, the compiled fit agrees with eager, the flat Adam is Adam, finished rows stay frozen, pool
draws do not depend on the batch, no host sync inside a CUDA step, and the channels-last session
gives the model back exactly."""
import pytest
import torch
import torch._dynamo

from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.medcam.backgrounds import BackgroundSampler
from medcam_fast.medcam.fit import fast_loss, fit_fast, fit_targets, layer_metrics
from medcam_fast.medcam.step import FitStep
from medcam_fast.medcam.unet import StackedAdam, StackedUNet, adam_update
from medcam_fast.models.adapter import FrozenClassifier

from _testing import devices
from planted import make_planted, train_tiny_cnn

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return train_tiny_cnn(seed=0, n=256, epochs=2)


def _step_inputs(model, cfg, n, device):
    x, _, _ = make_planted(n, size=SIZE, seed=4, positive_only=True)
    x = x.to(device)
    clf = FrozenClassifier(model.to(device))
    clf.prepare(x)
    return x, clf


def _parts(clf, x, cfg):
    logits, feats = clf.forward(x, with_activations=True)
    label = logits.argmax(1)
    unet = StackedUNet.from_config(cfg, x.shape[0], 1, 0, x.device, x.dtype, tuple(x.shape[-2:])).requires_grad_()
    opt = StackedAdam(unet.parameters(), cfg.fit.lr, lr_scale=unet.lr_scales(cfg.fit.offset_lr_scale))
    sampler = BackgroundSampler("gaussian", x, 0)
    thresholds = sampler.thresholds(cfg.steps, cfg.fit.threshold, cfg.fit.anneal, x[:, :1])
    backgrounds = torch.stack([sampler.draw()])
    return label, fit_targets(logits, feats, label), unet, opt, thresholds, backgrounds


@pytest.mark.parametrize("objective", ["preservation", "dual"])
def test_real_step_has_no_graph_break(model, objective):
    cfg = MedCAMConfig(objective=objective, steps=4)
    x, clf = _step_inputs(model, cfg, 2, torch.device("cpu"))
    with clf.session():
        label, targets, unet, opt, thr, bg = _parts(clf, x, cfg)
        step = FitStep(clf.traced(), unet, cfg, fast_loss, layer_metrics(cfg, len(clf.layers)))
        torch._dynamo.config.trace_autograd_ops = True
        active = torch.ones(2, dtype=torch.bool)
        out = torch._dynamo.explain(step.functional)(unet.flat, opt.m, opt.v, opt.t, opt.lr_col, x, label, targets,
                                                      thr[0], bg, active)
    assert out.graph_break_count == 0 and out.graph_count == 1, [str(b.reason)[:200] for b in out.break_reasons]
    ops = {str(n.target) for g in out.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")}
    # the whole step is in the one graph: the fused ops, the gradient and the in-place update
    assert any("medcam_fast.compose" in o for o in ops) and any("medcam_fast.mask_priors" in o for o in ops), ops
    assert any(o.startswith("<function grad ") for o in ops) and "sub_" in ops, sorted(ops)


def test_traced_classifier_gives_the_hooked_outputs(model):
    x, clf = _step_inputs(model, MedCAMConfig(), 3, torch.device("cpu"))
    with clf.session():
        a_logits, a_feats = clf.forward(x, with_activations=True)
        b_logits, b_feats = clf.traced().forward(x, with_activations=True)
    assert torch.equal(a_logits, b_logits) and all(torch.equal(a, b) for a, b in zip(a_feats, b_feats))


def test_untraceable_model_is_a_clear_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            if h.mean() > 0:   # data-dependent control flow: FX cannot trace it
                h = h * 2
            return self.fc(h.mean((2, 3)))

    ex = Explainer(Branchy(), MedCAMConfig(compile=True, steps=2, fit=dict(min_steps=2, check_every=2)))
    with pytest.raises(ValueError, match="torch.fx"):
        ex(torch.randn(1, 1, SIZE, SIZE))


@pytest.mark.slow
def test_compiled_fit_agrees_with_eager(model):
    cfg = MedCAMConfig(steps=6, fit=dict(min_steps=6, check_every=6, finished="mask"))
    x, clf = _step_inputs(model, cfg, 2, torch.device("cpu"))
    out = {}
    with clf.session():
        logits, feats = clf.forward(x, with_activations=True)
        label = logits.argmax(1)
        for compiled in (False, True):
            c = cfg.replace(compile=compiled)
            sampler = BackgroundSampler("gaussian", x, 0)
            out[compiled] = fit_fast(clf, x, label, fit_targets(logits, feats, label), sampler, c, 0,
                                     step_clf=clf.traced() if compiled else None).logits
    # six steps from the same start: rounding differs (fused kernels), the fit does not
    assert torch.allclose(out[True], out[False], atol=5e-3, rtol=1e-3), (out[True] - out[False]).abs().max()


def test_flat_adam_is_adam():
    torch.manual_seed(0)
    p0 = torch.randn(3, 10)
    ref = p0.clone().requires_grad_()
    opt_ref = torch.optim.Adam([ref], lr=1e-2)
    p = p0.clone().requires_grad_()
    opt = StackedAdam([p], 1e-2)
    for i in range(5):
        g = torch.randn(3, 10)
        ref.grad = g.clone()
        opt_ref.step()
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p, ref, atol=1e-6), (p - ref).abs().max()
    assert p.grad is not None and not p.grad.any()   # kept allocated, zeroed


def test_masked_rows_are_not_updated():
    p = torch.randn(4, 6)
    before = p.clone()
    m, v, t = torch.zeros_like(p), torch.zeros_like(p), torch.ones(())
    active = torch.tensor([True, False, True, False])
    adam_update(p, torch.randn(4, 6), m, v, t, torch.full((6,), 0.1), active=active)
    assert torch.equal(p[~active], before[~active]) and not torch.equal(p[active], before[active])


def test_pool_draws_do_not_depend_on_the_batch():
    pool = torch.randn(12, 1, 8, 8)
    eligible = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9])]
    x = torch.zeros(3, 1, 8, 8)
    batch = BackgroundSampler("fills", x, 5, pool=pool, eligible=eligible, draws=20)
    for i in range(3):
        alone = BackgroundSampler("fills", x[i:i + 1], 5, pool=pool, eligible=eligible[i:i + 1], draws=20)
        assert torch.equal(alone.table[0], batch.table[i])
        assert set(batch.table[i].tolist()) <= set(eligible[i].tolist())
    later = batch.select(torch.tensor([2]))
    assert torch.equal(later.draw(7), pool[batch.table[2, 7]][None])


@pytest.mark.parametrize("device", devices, ids=str)
def test_step_does_not_sync(model, device):
    if device.type != "cuda":
        pytest.skip("host syncs are a CUDA matter (torch.cuda.set_sync_debug_mode)")
    cfg = MedCAMConfig(steps=4)
    x, clf = _step_inputs(model, cfg, 2, device)
    with clf.session():
        label, targets, unet, opt, thr, bg = _parts(clf, x, cfg)
        step = FitStep(clf, unet, cfg, fast_loss, layer_metrics(cfg, len(clf.layers)))
        step(unet, opt, x, label, targets, thr[0], bg)   # warm-up (cuDNN, allocator)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(3):
                step(unet, opt, x, label, targets, thr[i], bg, torch.ones(2, dtype=torch.bool, device=device))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_channels_last_session_gives_the_model_back(model):
    before = [(p.data_ptr(), p.stride(), p.clone()) for p in model.parameters()]
    res = Explainer(model, MedCAMConfig(steps=4, fit=dict(min_steps=4, check_every=4, channels_last=True), checks=dict(n_random=2)))(
        make_planted(1, size=SIZE, seed=1, positive_only=True)[0])
    assert res.mask.shape == (1, SIZE, SIZE)
    for p, (ptr, stride, value) in zip(model.parameters(), before):
        assert p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, value)

"""Med-CAM core: planted evidence, loss terms, reference mode, determinism, model hygiene, bad input."""
import math

import pytest
import torch
from torch import nn

from medcam_fast import Explainer, Explanation, MedCAMConfig, explain, paper_config
from medcam_fast.medcam import losses
from medcam_fast.medcam.fit import fit_paper
from medcam_fast.models.adapter import FrozenClassifier

from planted import SQUARE, CornerClassifier, make_planted, tiny_cnn, train_tiny_cnn

QUICK = MedCAMConfig(steps=30, fit=dict(min_steps=10, check_every=10))


@pytest.fixture(scope="module")
def planted_model():
    return train_tiny_cnn(seed=0)


def _iou(a, b):
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return inter / union


# ---------------------------------------------------------------- (a) planted evidence


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_evidence_is_found(planted_model, seed):
    # Robust statistics over 20 images, so that a fit that fails on one image (it happens, on
    # every CPU, to 1 or 2 images in 20: a flat map, most of the image kept) cannot decide the
    # outcome; the mean area, which one such image moves from 1.1% to 10%, is not asserted.
    # Measured with seeds 0-4 under each CPU clone with torch held to the same ISA (avx512, avx2,
    # scalar/default; `make test-isa`): median area 0.98% (the square: 1.2%) and median IoU 0.82 in
    # all 15 runs, 90-95% of images found. Each bound is far from those figures and still fails a
    # method that misses the square (a random 1.2% mask has IoU ~0.01).
    x, _, planted = make_planted(20, seed=11, positive_only=True)
    xr, yr, _ = make_planted(64, seed=9)
    reference = xr[yr == 0][:16]  # images without the square: the counterfactual context
    res = explain(planted_model, x, counterfactuals=reference, seed=seed)
    shape_area = SQUARE * SQUARE / (64 * 64)
    iou = _iou(res.mask, planted)
    found = (iou >= 0.3) & (res.area <= 3 * shape_area)
    assert res.kept_on_baseline.float().mean() >= 0.9, res.kept_on_baseline
    assert res.area.median() <= 2 * shape_area, (res.area, shape_area)
    assert iou.median() >= 0.5, iou
    assert found.float().mean() >= 0.7, (iou, res.area)


# ---------------------------------------------------------------- (b) loss terms


def test_activation_mse_by_hand():
    t = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])          # [1,2,1,2]
    f = torch.tensor([[[[0.0, 3.0]], [[2.0, 4.0]]]])
    scale = losses.channel_rms(t)                              # sqrt(5), 2
    expect = ((1 / math.sqrt(5)) ** 2 + 0 + 0 + (2 / 2) ** 2) / 4
    torch.testing.assert_close(losses.activation_mse(f, t, scale), torch.tensor([expect]), atol=1e-5, rtol=1e-5)


def test_activation_cosine_by_hand():
    t = torch.tensor([[[[1.0, 0.0]]]])
    f = torch.tensor([[[[1.0, 1.0]]]])
    torch.testing.assert_close(losses.activation_cosine(f, t), torch.tensor([1 - 1 / math.sqrt(2)]))
    torch.testing.assert_close(losses.activation_cosine(t, t), torch.tensor([0.0]))


def test_activation_matching_weights_layers():
    t = [torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)]
    f = [torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)]    # layer 0 off by one rms, layer 1 exact
    scales = [losses.channel_rms(v) for v in t]
    am = losses.activation_matching(f, t, scales, [1.0, 3.0], ["mse", "mse"])
    torch.testing.assert_close(am, torch.tensor([1.0 / 4.0]), atol=1e-5, rtol=1e-5)


def test_kl_by_hand():
    z_x = torch.tensor([[2.0, 0.0]])
    z_e = torch.tensor([[0.0, 0.0]])
    t = 2.0
    p = torch.softmax(z_x / t, 1)
    expect = (p * (p.log() - math.log(0.5))).sum() * t * t
    torch.testing.assert_close(losses.kl_to_input(z_e, z_x, t), expect.view(1))
    torch.testing.assert_close(losses.kl_to_input(z_x, z_x, t), torch.zeros(1), atol=1e-7, rtol=0)


def test_ce_and_hinge_by_hand():
    z = torch.tensor([[math.log(3.0), 0.0]])                   # p(0) = 3/4
    y = torch.tensor([0])
    torch.testing.assert_close(losses.label_ce(z, y), torch.tensor([-math.log(0.75)]))
    torch.testing.assert_close(losses.label_ce_hinge(z, y, -math.log(0.6)), torch.tensor([0.0]))
    torch.testing.assert_close(losses.label_ce_hinge(z, y, 0.1), torch.tensor([-math.log(0.75) - 0.1]))


def test_mask_priors_term_by_hand():
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]])       # sigmoid = 0.5 everywhere
    pri = losses.mask_priors(logits, temperature=1.0, diagonal=True)
    torch.testing.assert_close(pri, torch.tensor([[0.5, 0.25, 0.0]]))


# ---------------------------------------------------------------- (c) reference mode


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_reference_mode_runs_the_papers_passes():
    torch.manual_seed(0)
    model = _Counting(tiny_cnn().eval())
    clf = FrozenClassifier(model, layers=["inner.1", "inner.3", "inner.6", "inner.8"])
    cfg = paper_config(steps=3, fit=dict(unet_widths=(8, 16)))
    assert (cfg.fit.act, cfg.fit.ce, cfg.fit.kl, cfg.fit.kl_temperature, cfg.priors.area_weight, cfg.priors.bin, cfg.priors.tv, cfg.fit.rob, cfg.fit.lr) == \
        (10, 15, 5, 2, 100, 1, 500, 100, 5e-5)
    assert cfg.fit.am_metric == "paper" and cfg.priors.tv_diagonal and cfg.baseline == 0.0 and cfg.fit.binarize == "threshold"
    x, _, _ = make_planted(1, seed=3)
    with clf.session():
        model.calls = 0
        out = fit_paper(clf, x, torch.tensor([1]), cfg, seed=0)
    # per step: f(x) recomputed, f(e), and three separate robustness passes
    assert model.calls == 3 * 5
    assert out.logits.shape == (1, 1, 64, 64) and out.steps.tolist() == [3]


def test_reference_mode_through_explain():
    model = tiny_cnn().eval()
    x, _, _ = make_planted(1, seed=3)
    res = explain(model, x, mode="paper", config=paper_config(steps=2, fit=dict(unet_widths=(8, 16))))
    assert res.mode == "paper" and res.steps.tolist() == [2] and res.selection[0].startswith("threshold")


# ---------------------------------------------------------------- (d) determinism


def test_same_seed_same_mask(planted_model):
    x, _, _ = make_planted(2, seed=4, positive_only=True)
    a = explain(planted_model, x, config=QUICK, seed=5)
    b = explain(planted_model, x, config=QUICK, seed=5)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.soft_mask, b.soft_mask)


# ---------------------------------------------------------------- (e) model hygiene


def _snapshot(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_model_unchanged_and_hooks_released():
    model = tiny_cnn()
    model.train()
    model[0].eval()
    model[2].weight.requires_grad_(False)
    before = _snapshot(model)
    x, _, _ = make_planted(2, seed=1)
    explain(model, x, config=QUICK)
    after = _snapshot(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert _hooks(model) == 0


def test_batchnorm_buffers_unchanged():
    # the traced classifier traces in train mode too, which bumped num_batches_tracked once (the
    # amortised explainer's fingerprint caught it): every buffer must come back as it was
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _, _ = make_planted(2, seed=1)
    res = explain(model, x, config=QUICK.replace(fit=dict(classifier_path="traced")))
    assert len(res) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _FailsLater(nn.Module):
    """Fails after the dry runs, in the middle of explain."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = tiny_cnn(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("boom")
        return self.net(x)


def test_model_restored_when_explain_raises():
    model = _FailsLater().train()
    before = _snapshot(model)
    x, _, _ = make_planted(1, seed=1)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, config=QUICK)
    after = _snapshot(model)
    assert before[0] == after[0] and before[1] == after[1] and _hooks(model) == 0


# ---------------------------------------------------------------- result contract


def test_explanation_fields(planted_model):
    x, _, _ = make_planted(3, seed=2)
    res = explain(planted_model, x[0], config=QUICK)        # [C,H,W] input gets a batch axis
    assert isinstance(res, Explanation) and len(res) == 1
    x = x[:3]
    res = explain(planted_model, x, config=QUICK, target=torch.tensor([0, 1, 1]))
    assert res.mask.dtype == torch.bool and res.mask.shape == (3, 64, 64)
    assert res.soft_mask.shape == (3, 64, 64) and 0 <= res.soft_mask.min() and res.soft_mask.max() <= 1
    assert res.evidence.shape == (3, 1, 64, 64) and res.label.tolist() == [0, 1, 1]
    for name in ("prob_input", "prob_evidence", "area", "prob_null", "kept_robust"):
        assert getattr(res, name).shape == (3,) and getattr(res, name).is_floating_point()
    assert res.kept_on_baseline.dtype == torch.bool and res.null_keeps_label.dtype == torch.bool
    assert res.steps.dtype == torch.long and isinstance(res.seconds, float) and res.seconds > 0
    assert all(s in ("ok", "null_keeps_label", "not_minimal", "not_kept") for s in res.status)
    # evidence and kept are what they claim: recompute them
    m = res.mask[:, None].float()
    torch.testing.assert_close(res.evidence, m * x + (1 - m) * 0.0)
    with torch.no_grad():
        out = planted_model(res.evidence)
    assert torch.equal(out.argmax(1) == res.label, res.kept_on_baseline)
    torch.testing.assert_close(out.softmax(1).gather(1, res.label[:, None])[:, 0], res.prob_evidence)
    torch.testing.assert_close(res.area, res.mask.flatten(1).float().mean(1))


# ---------------------------------------------------------------- (f) bad input


class _Flat(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3, 1))        # [N], not [N,K]


@pytest.mark.parametrize("make, match", [
    (lambda: torch.rand(64, 64), "rank 2"),
    (lambda: torch.rand(1, 1, 1, 64, 64), "rank 5"),
    (lambda: torch.rand(0, 1, 64, 64), "empty batch"),
    (lambda: torch.rand(1, 3, 64, 64), "cannot take x"),
    (lambda: torch.full((1, 1, 64, 64), float("nan")), "NaN or Inf"),
    (lambda: torch.full((1, 1, 64, 64), float("inf")), "NaN or Inf"),
    (lambda: torch.ones(1, 1, 64, 64, dtype=torch.long), "floating point"),
    (lambda: torch.rand(1, 1, 4, 64), "at least 8x8"),
    (lambda: [[1.0]], "torch.Tensor"),
])
def test_bad_input(planted_model, make, match):
    with pytest.raises(ValueError, match=match):
        explain(planted_model, make(), config=QUICK)


def test_bad_model_output():
    with pytest.raises(ValueError, match=r"logits \[N,K\]"):
        explain(nn.Sequential(nn.Conv2d(1, 2, 3), _Flat()), torch.rand(1, 1, 16, 16), config=QUICK)


@pytest.mark.parametrize("target, match", [(5, r"\[0, 2\)"), (torch.tensor([0, 1]), r"\[N\]=1"), (1.5, "target")])
def test_bad_target(planted_model, target, match):
    with pytest.raises(ValueError, match=match):
        explain(planted_model, torch.rand(1, 1, 64, 64), target=target, config=QUICK)


def test_bad_config_and_mode(planted_model):
    with pytest.raises(ValueError, match="mode"):
        Explainer(planted_model, mode="slow")
    with pytest.raises(ValueError, match="background"):
        Explainer(planted_model, MedCAMConfig(fit=dict(background="plaid")))
    with pytest.raises(ValueError, match="no module"):
        Explainer(planted_model, MedCAMConfig(fit=dict(layers=["nope"])))


def test_device_mismatch_is_refused(planted_model):
    with pytest.raises(ValueError, match="never moves your model"):
        Explainer(planted_model, device="cuda:0")


# ---------------------------------------------------------------- sufficiency verification


def _corner_case(k=32):
    x = torch.zeros(2, 1, 8, 8)
    x[:, 0, :4, :4] = 1.0
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    masks[:, 0] = True                        # the whole image: sufficient
    masks[:, 1, :4, :4] = True                # the corner: sufficient
    masks[:, 2, 4:, 4:] = True                # elsewhere: never
    bgs = torch.zeros(2, k, 1, 8, 8)
    bgs[:, ::9, 0, :4, :4] = 1.0              # 4 of 32 backgrounds carry the corner themselves
    return x, torch.ones(2, dtype=torch.long), masks, bgs


def test_sequential_kept_robust_decides_as_all_composites():
    from medcam_fast.medcam.verify import allowed_failures, kept_robust_of_masks, sequential_kept_robust

    assert allowed_failures(32, 0.9) == 3 and allowed_failures(8, 0.9) == 0 and allowed_failures(10, 0.9) == 1
    x, label, masks, bgs = _corner_case()
    model = CornerClassifier()
    full = kept_robust_of_masks(model, x, label, masks, bgs)
    every = torch.ones(2, 3, dtype=torch.bool)
    rob = sequential_kept_robust(model, x, label, masks, bgs, every, 0.9, 64)
    torch.testing.assert_close(rob[:, :2], full[:, :2])                # run to the end: exact
    # a candidate that loses more than 3 of 32 stops early, below the threshold
    model.calls = 0
    needed = torch.tensor([[False, False, True]] * 2)
    rob = sequential_kept_robust(model, x, label, masks, bgs, needed, 0.9, 64)
    assert model.calls == 2 * 8 and (rob[:, 2] < 0.9).all()           # one chunk of 8, then stopped
    assert torch.isnan(rob[:, :2]).all()                                # not needed: never run


def test_counterfactual_audit_is_off_the_path_to_ok(planted_model, monkeypatch):
    # kept_robust is an audit: off by default (NaN, no pool built); when asked for, an image with
    # no background of another label gets NaN rather than a placeholder's verdict, and the
    # status is the sufficiency test's alone
    from medcam_fast.medcam import explainer as explainer_mod

    x, _, _ = make_planted(2, seed=2, positive_only=True)
    xr, yr, _ = make_planted(64, seed=9)
    plain = explain(planted_model, x, config=QUICK)
    assert torch.isnan(plain.kept_robust).all() and plain.backgrounds == ""
    real = explainer_mod.build_pool

    def one_missing(*args, **kwargs):
        pool = real(*args, **kwargs)
        pool.missing = torch.tensor([True, False])
        return pool

    monkeypatch.setattr(explainer_mod, "build_pool", one_missing)
    audited = explain(planted_model, x, config=QUICK.replace(checks=dict(audit_counterfactual=True)), counterfactuals=xr[yr == 0][:16])
    assert math.isnan(audited.kept_robust[0]) and not math.isnan(audited.kept_robust[1])
    assert audited.status == plain.status and torch.equal(audited.mask, plain.mask)


@pytest.mark.parametrize("n_ref, k", [(40, 8), (12, 8), (3, 32), (1, 4)])
def test_counterfactual_pool_keeps_verification_apart(n_ref, k):
    from medcam_fast.medcam.counterfactual import build_pool

    model = CornerClassifier()
    x = torch.zeros(2, 1, 8, 8)
    x[:, 0, :4, :4] = 1.0                                           # both class 1
    ref = torch.zeros(n_ref, 1, 8, 8)                                # all class 0
    ref += torch.arange(n_ref).view(-1, 1, 1, 1) * 1e-3              # distinct images
    pool = build_pool(model, x, torch.ones(2, dtype=torch.long), ref, k, seed=0, batch_size=64, use_batch=False)
    assert pool.verify_index.shape == (2, k) and not pool.missing.any()
    for i in range(2):
        verify, train = set(pool.verify_index[i].tolist()), set(pool.train_eligible[i].tolist())
        eligible = len(verify | train)
        assert (pool.labels[list(verify | train)] == 0).all()     # only other labels
        if eligible >= 2:
            assert not verify & train and len(verify) == min(k, eligible // 2), (verify, train)
            if eligible // 2 < k:
                assert "distinct verification backgrounds" in pool.description
        else:
            assert verify == train

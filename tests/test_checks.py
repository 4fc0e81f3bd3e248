"""The adaptive checks (medcam_fast.medcam.checks) against the full test: the same decisions on
classifiers with known answers, in tens of classifier passes (counted at the classifier), and
the sequential random control's rule."""
import itertools
import re

import pytest
import torch

from medcam_fast import MedCAMConfig, explain
from medcam_fast.data.shortcuts import get_shortcut
from medcam_fast.evaluation.cases import build_shortcut_cases
from medcam_fast.medcam.checks import _Image, _random_control, binomial_bounds, random_verdict, run_jobs
from medcam_fast.models.passes import PassCounter

from _testing import devices
from planted import MARK_VALUE, TwoCueClassifier, make_two_cue

FAST = dict(steps=30, necessary="occlusion", fit=dict(min_steps=20, check_every=10))


def _two_cue(needs_lesion: bool, n: int):
    model = TwoCueClassifier(needs_lesion)
    x, lesion = make_two_cue(n, seed=5)
    cases = build_shortcut_cases(model, x, torch.zeros(n, dtype=torch.long), lesion, [str(i) for i in range(n)],
                                 get_shortcut("tag"), 1, torch.tensor([MARK_VALUE]), seed=0)
    return model, cases.x


def _both(model, x, device, **cfg):
    """The same explanation with the full and the adaptive checks, and the passes the adaptive
    call's checks spent as counted at the classifier (the call's total less the full call's
    part before its checks: the fit and the rankings are the same)."""
    model, x = model.to(device), x.to(device)
    out = {}
    for checks in ("full", "adaptive"):
        config = MedCAMConfig(**{**FAST, **cfg}).replace(checks=dict(mode=checks))
        with PassCounter(model) as c:
            out[checks] = explain(model, x, config=config, seed=0)
        out[checks + "_passes"] = c.images
    return out


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("needs_lesion", [False, True])
def test_adaptive_checks_reach_the_full_tests_decisions(needs_lesion, device):
    """A mark that suffices alone (both sides ok) and one that is necessary only: the adaptive rule
    gives every image the full test's status and sufficiency decision on both sides, from the
    same rankings, at most 40 passes per image and side, and the classifier counts them."""
    model, x = _two_cue(needs_lesion, 4)
    r = _both(model, x, device)
    full, ad = r["full"], r["adaptive"]
    assert torch.equal(full.mask_logits, ad.mask_logits) and torch.equal(full.necessary_logits, ad.necessary_logits)
    assert ad.status == full.status and ad.necessary_status == full.necessary_status, (ad.reason, full.reason)
    assert torch.equal(ad.sufficient, full.sufficient) and torch.equal(ad.necessary_flipped, full.necessary_flipped)
    if not needs_lesion:
        assert ad.status == ["ok"] * 4 and ad.necessary_status == ["ok"] * 4
    assert "ok" in ad.necessary_status
    assert (ad.check_passes <= 40).all() and (ad.necessary_check_passes <= 40).all(), \
        (ad.check_passes, ad.necessary_check_passes)
    assert (full.check_passes >= 100).all() and (full.necessary_check_passes >= 100).all()
    # everything else in the two calls is the same work: the difference is the checks' passes
    saved = int((full.check_passes + full.necessary_check_passes).sum()
                - (ad.check_passes + ad.necessary_check_passes).sum())
    assert r["full_passes"] - r["adaptive_passes"] == saved
    # an ok side ran its random control until the verdict was settled, and reports how many
    ok = torch.tensor([s == "ok" for s in ad.necessary_status])
    assert (ad.necessary_random_draws[ok] >= 1).all() and (ad.necessary_random_draws[ok] <= 16).all()
    assert "of 13 draws" in ad.headline(int(ok.nonzero()[0])) or "of 16 draws" in ad.headline(int(ok.nonzero()[0]))


def test_the_chosen_mask_and_a_star_match_where_the_curve_is_monotone():
    """On the mark that suffices alone the preservation curve is a step: the bisection lands on the
    full test's smallest sufficient area."""
    model, x = _two_cue(False, 3)
    r = _both(model, x, torch.device("cpu"))
    full, ad = r["full"], r["adaptive"]
    assert torch.equal(ad.mask, full.mask) and torch.equal(ad.a_star, full.a_star)
    known = ~torch.isnan(ad.evidence_curve)
    assert known.sum(1).min() >= 1 and known.sum(1).max() < len(MedCAMConfig().checks.area_grid)
    assert torch.allclose(ad.evidence_curve[known], full.evidence_curve[known], atol=1e-5)


def test_untestable_images_spend_no_search_passes():
    """Where no fill is certified neither side can show anything: both rules say null_keeps_label,
    and the adaptive one spends only the two plain passes of the evidence and the outline."""
    model, x = _two_cue(False, 2)
    r = _both(model, x, torch.device("cpu"), checks=dict(certify_margin=1e6))
    full, ad = r["full"], r["adaptive"]
    assert full.status == ad.status == ["null_keeps_label"] * 2
    assert ad.necessary_status == ["null_keeps_label"] * 2
    assert ad.check_passes.tolist() == [2, 2] and ad.necessary_check_passes.tolist() == [0, 0]
    assert torch.isnan(ad.random_pass).all() and (ad.random_draws == 0).all()


def test_random_verdict_is_the_full_tests_verdict_without_confidence():
    """Curtailment alone is exact: on every pass/fail sequence of 10 draws (bound 0.2) the verdict
    at the stop is the one all 10 give, and it stops as soon as the rest cannot change it."""
    k, bound = 10, 0.2
    for seq in itertools.product([0, 1], repeat=k):
        full = "below" if sum(seq) / k <= bound else "above"
        for t in range(k + 1):
            v = random_verdict(sum(seq[:t]), t, k, bound, None)
            if v is not None:
                assert v == full, (seq, t)
                break
        else:
            raise AssertionError("no verdict after every draw")
        # it stopped at the first draw where the verdict was fixed
        assert all(len({"below" if (sum(seq[:t]) + sum(rest)) / k <= bound else "above"
                        for rest in itertools.product([0, 1], repeat=k - t)}) == 2 for t in range(t))


def test_binomial_bounds_are_exact():
    lo, hi = binomial_bounds(0, 14, 0.95)
    assert lo == 0 and hi == pytest.approx(1 - 0.05 ** (1 / 14))
    lo, hi = binomial_bounds(5, 5, 0.95)
    assert hi == 1 and lo == pytest.approx(0.05 ** (1 / 5))
    # Beta quantiles (scipy.stats.beta.ppf(0.05, 3, 2) and .ppf(0.95, 3, 18)): no scipy needed at run time
    assert binomial_bounds(3, 4, 0.95)[0] == pytest.approx(0.2486046257, abs=1e-8)
    assert binomial_bounds(2, 20, 0.95)[1] == pytest.approx(0.2826, abs=1e-4)
    # with many draws and no passes the bound decides before curtailment would
    assert random_verdict(0, 30, 64, 0.2, 0.95) == "below" and random_verdict(0, 30, 64, 0.2, None) is None
    assert random_verdict(13, 20, 64, 0.2, 0.95) == "above" and random_verdict(13, 20, 64, 0.2, None) == "above"


def test_run_jobs_batches_every_pending_request_in_one_pass():
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)

    def job(v, rounds):
        got = []
        for _ in range(rounds):
            got.append(float((yield torch.full((2, 1, 2, 2), float(v)))[0, 0]))
        return got

    results, passes = run_jobs(forward, [job(1, 2), job(2, 3), job(3, 1)], batch_size=64)
    assert calls == [6, 4, 2] and passes == [4, 6, 2]
    assert results == [[4.0, 4.0], [8.0] * 3, [12.0]]


def test_config_refuses_what_the_adaptive_checks_cannot_do():
    with pytest.raises(ValueError, match="checks.mode must be"):
        MedCAMConfig(checks=dict(mode="fast")).validate()
    with pytest.raises(ValueError, match="mask_fills"):
        MedCAMConfig(checks=dict(mask_fills=("impute",))).validate()
    with pytest.raises(ValueError, match="random_confidence"):
        MedCAMConfig(checks=dict(random_confidence=1.0)).validate()
    MedCAMConfig(checks=dict(mask_fills=("impute",), mode="full")).validate()
    assert MedCAMConfig().checks.mode == "adaptive"


@pytest.mark.parametrize("keeps", [True, False])
def test_random_control_stops_as_soon_as_settled(keeps):
    """Random blobs that always keep the call are rejected after the fewest draws that settle it
    (4 of 16 at bound 0.2), each under all three fills; blobs that never keep it are accepted
    after 13 draws, each tried under one fill only (the first failure ends a blob's test)."""
    img = _Image(torch.zeros(1, 32, 32), 1, torch.zeros(3, 1, 32, 32), torch.tensor([-3.0, -2.0, -1.0]),
                 torch.tensor([True, True, True]))
    cfg = MedCAMConfig(checks=dict(n_random=16, random_bound=0.2))

    def forward(x):
        m = torch.full((x.shape[0],), 5.0 if keeps else -5.0)
        return torch.stack([-m, m], 1)

    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:8, :8] = True
    (rate, drawn), = run_jobs(forward, [_random_control(img, float(mask.float().mean()), "preservation", 1.0,
                                                          cfg, 0)], 64)[0]
    passes = run_jobs(forward, [_random_control(img, 0.0625, "preservation", 1.0, cfg, 0)], 64)[1][0]
    assert (rate, drawn, passes) == ((1.0, 4, 12) if keeps else (0.0, 13, 13))


def test_no_fit_where_nothing_can_be_shown():
    """An image whose every fill alone gives its label (unmarked: class 0 everywhere) is neither
    fitted nor occluded: steps 0, empty masks, null_keeps_label; the marked image beside it gets
    exactly the explanation it gets alone. With skip_untestable off it is fitted, to the same status."""
    model, marked = _two_cue(False, 1)
    plain, _ = make_two_cue(1, seed=9)
    x = torch.cat([marked, plain])
    cfg = MedCAMConfig(**FAST)
    both = explain(model, x, config=cfg, seed=0)
    alone = explain(model, marked, config=cfg, seed=0)
    assert both.label.tolist() == [1, 0] and both.status[1] == both.necessary_status[1] == "null_keeps_label"
    assert both.steps.tolist() == [int(alone.steps[0]), 0]
    assert not both.mask[1].any() and not both.necessary_mask[1].any()
    assert torch.equal(both.mask_logits[0], alone.mask_logits[0]) and torch.equal(both.mask[0], alone.mask[0])
    assert torch.equal(both.necessary_logits[0], alone.necessary_logits[0])
    assert both.status[0] == alone.status[0] and both.necessary_status[0] == alone.necessary_status[0]
    fitted = explain(model, x, config=cfg.replace(checks=dict(skip_untestable=False)), seed=0)
    assert int(fitted.steps[1]) > 0 and fitted.status[1] == "null_keeps_label"


def test_checks_halve_their_batches_on_out_of_memory():
    """A classifier pass that runs out of memory above 3 images is retried at half the size, with a
    warning, and gives the same logits; at one image the error is raised as out of memory."""
    from medcam_fast.medcam.verify import batched_logits

    def forward(x):
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x.flatten(1)[:, :2] * 2

    x = torch.randn(10, 1, 4, 4)
    with pytest.warns(RuntimeWarning, match="halving"):
        out = batched_logits(forward, x, 8)
    assert torch.equal(out, x.flatten(1)[:, :2] * 2)

    def never(x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match="allocate"), pytest.warns(RuntimeWarning):
        batched_logits(never, x, 4)


class _OomModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_reported_as_out_of_memory(monkeypatch):
    """explain() lets the out-of-memory error through (not "the model cannot take x"), and the
    command line says "out of memory" and exits 3, not 2 as for bad input."""
    with pytest.raises(torch.OutOfMemoryError):
        explain(_OomModel(), torch.randn(1, 1, 16, 16))
    from medcam_fast import cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli, "COMMANDS", {name: oom for name in cli.COMMANDS})
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["info"])
    assert rc == 3 and "out of memory" in err.getvalue()


@pytest.mark.parametrize("bad, message", [
    (dict(compile=True, fit=dict(finished="drop")), "compile=True needs fit.finished='mask'"),
    (dict(fit=dict(mask_temperature=0.0)), "fit.mask_temperature must be > 0"),
    (dict(fit=dict(mask_temperature=-1.0)), "fit.mask_temperature must be > 0"),
    (dict(fit=dict(lr=0.0)), "fit.lr must be > 0"),
    (dict(fit=dict(patience=0)), "fit.patience must be >= 1"),
    (dict(fit=dict(min_steps=-1)), "fit.min_steps >= 0"),
    (dict(checks=dict(area_grid=())), "checks.area_grid must be increasing"),
    (dict(checks=dict(area_grid=(0.1, 0.05))), "checks.area_grid must be increasing"),
    (dict(checks=dict(area_grid=(0.0, 0.5))), "checks.area_grid must be increasing"),
    (dict(checks=dict(area_grid=(0.5, 1.5))), "checks.area_grid must be increasing"),
    (dict(checks=dict(min_area=0.5, max_area=0.4)), "checks.min_area < checks.max_area"),
    (dict(priors=dict(area_weight=-1.0)), "priors.area_weight must be >= 0"),
    (dict(checks=dict(mode="fast")), "checks.mode must be one of"),
])
def test_validate_rejects_what_cannot_work(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MedCAMConfig(**bad).validate()
    # the same fields at workable values pass
    MedCAMConfig(compile=True, fit=dict(finished="mask", mask_temperature=0.5, lr=1e-3, patience=1, min_steps=0), checks=dict(area_grid=(0.1, 1.0))).validate()

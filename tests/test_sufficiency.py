"""The sufficiency test (medcam_fast.medcam.sufficiency) on classifiers whose answer is known by
construction: certification, preservation and deletion, the random-blob and shape controls, a*,
and the statuses that follow from them in ``explain``."""
import math

import pytest
import torch
from torch import nn

from medcam_fast import MedCAMConfig, explain
from medcam_fast.medcam import sufficiency as S

from planted import CornerClassifier, SQUARE, make_planted, train_tiny_cnn

QUICK = MedCAMConfig(steps=40, fit=dict(min_steps=20, check_every=10))


def _corner_image():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, :4, :4] = 1.0                      # class 1 because of the corner
    corner = torch.zeros(1, 16, 16, dtype=torch.bool)
    corner[0, :4, :4] = True
    return x, corner


def test_margins_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    assert S.margins(logits, torch.tensor([0, 0])).tolist() == [1.0, -3.0]
    need = S.required_margin(torch.tensor([4.0, 0.2, -1.0]), keep_margin=0.25, keep_share=0.5)
    torch.testing.assert_close(need, torch.tensor([0.25, 0.1, 0.0]))   # capped, a share of a weak lead, never below 0


def test_gaussian_blur_keeps_constants_and_mass():
    x = torch.full((2, 3, 20, 24), 0.7)
    torch.testing.assert_close(S.gaussian_blur(x, 2.0), x)
    spike = torch.zeros(1, 1, 33, 33)
    spike[0, 0, 16, 16] = 1.0
    b = S.gaussian_blur(spike, 2.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5) and b.max() < 0.05
    assert S.gaussian_blur(torch.rand(1, 1, 8, 8), 9.0).shape == (1, 1, 8, 8)   # radius clamped to the side


def test_certification_by_construction():
    model = CornerClassifier()
    x, _ = _corner_image()
    label = torch.tensor([1])
    fs = S.certify(model, x, label, ("baseline", "blur_fine", "blur_coarse", "mean"), 0.0, 1.0)
    assert fs.images.shape == (1, 4, 1, 16, 16)
    # blank and mean hold a corner mean below 0.5: certified; at 16x16 both blurs keep it above
    assert fs.certified.tolist() == [[True, False, False, True]], fs.margin_alone
    assert fs.described(0) == "baseline, mean"
    # a blank that already gives the label is never certified
    assert not S.certify(model, x, torch.tensor([0]), ("baseline",), 0.0, 1.0).certified.any()
    with pytest.raises(ValueError, match="unknown or no fills"):
        S.certify(model, x, label, ("plaid",), 0.0, 1.0)


def test_preservation_and_deletion_known_answers():
    model = CornerClassifier()
    x, corner = _corner_image()
    label = torch.tensor([1])
    fs = S.certify(model, x, label, ("baseline", "mean"), 0.0, 1.0)
    use = S.counted(fs)
    half = corner.clone()
    half[0, 2:] = False
    masks = torch.stack([corner, ~corner, half, torch.ones_like(corner)], dim=1)   # [1,4,H,W]
    ok, prob = S.preserved(S.run_side(model, x, label, masks, fs, "preservation"), use, 0.25)
    assert ok.tolist() == [[True, False, False, True]]
    assert prob[0, 0] > 0.99 and prob[0, 1] < 0.01
    gone, prob_removed = S.flipped(S.run_side(model, x, label, masks, fs, "deletion"), use)
    # removing the corner flips; removing half of it leaves a corner mean of 0.5 or more: no flip
    assert gone.tolist() == [[True, False, False, True]]
    with pytest.raises(ValueError, match="side must be"):
        S.run_side(model, x, label, masks, fs, "sideways")
    # no counted fill: nothing is sufficient, the probabilities are NaN
    none = torch.zeros_like(use)
    ok, prob = S.preserved(S.run_side(model, x, label, masks, fs), none, 0.25)
    assert not ok.any() and torch.isnan(prob).all()


def test_random_blobs_fail_where_the_evidence_is_small():
    model = CornerClassifier()
    x, corner = _corner_image()
    label = torch.tensor([1])
    fs = S.certify(model, x, label, ("baseline", "mean"), 0.0, 1.0)
    blobs = S.random_blob_masks(torch.tensor([16 / 256]), 16, (16, 16), seed=0)
    assert blobs.shape == (1, 16, 16, 16) and (blobs.flatten(2).sum(2) == 16).all()
    ctl = S.controls(model, x, label, corner, fs, 0.25, 16, seed=0)
    assert ctl.random_pass.item() <= 0.2            # blobs of the corner's area rarely cover it
    # the whole image: every random "blob" is the whole image too, and passes
    full = S.controls(model, x, label, torch.ones_like(corner), fs, 0.25, 8, seed=0)
    assert full.random_pass.item() == 1.0
    # the corner's outline alone (max inside, min outside) is the corner itself: it keeps the label
    assert bool(ctl.shape_keeps[0])
    # a mask-dependent fill gets its own random-blob column: it counts only where that stays low
    fs_imp = S.certify(model, x, label, ("baseline", "mean"), 0.0, 1.0, mask_fills=("impute",))
    by_fill = S.controls(model, x, label, corner, fs_imp, 0.25, 16, seed=0).random_pass_by_fill
    assert by_fill.shape == (1, 3)
    assert S.counted(fs_imp, by_fill[:, 2:] <= 0.2).shape == (1, 3)


def test_impute_fill_fills_only_removed_pixels_from_kept_ones():
    x = torch.rand(2, 3, 16, 16)
    keep = torch.zeros(2, 1, 16, 16)
    keep[:, :, :, :8] = 1
    out = S._MASK_FILLS["impute"](x, keep)
    assert out.shape == (2, 1, 3, 16, 16) and torch.isfinite(out).all()
    lo, hi = x[..., :8].amin(), x[..., :8].amax()
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6    # a weighted mean of kept pixels


def test_extremal_area():
    ok = torch.tensor([[False, True, True], [False, False, False]])
    a = S.extremal_area((0.1, 0.25, 0.5), ok)
    assert a[0].item() == 0.25 and math.isnan(a[1].item())


# ------------------------------------------------------------------ the test inside explain


@pytest.fixture(scope="module")
def planted_model():
    return train_tiny_cnn(seed=0)


@pytest.mark.slow
def test_single_image_calls_find_the_square_without_a_reference(planted_model):
    # One image per call, no reference set: every fill comes from x itself. Measured with the
    # defaults on the 12 images of make_planted(12, seed=7) (these 8 are its first): mean IoU 0.82,
    # 11 of 12 sufficient and ok; the 12th fit stays near the whole image and is not ok. The
    # bounds leave room for a fit that fails on one or two more images, and still fail a method
    # that misses the square (a random 1.2% mask has IoU ~0.01).
    x, _, gt = make_planted(8, seed=7, positive_only=True)
    shape_area = SQUARE * SQUARE / 64 ** 2
    ious, ok = [], 0
    for i in range(8):
        res = explain(planted_model, x[i:i + 1], seed=0)
        m = res.mask[0]
        ious.append(float((m & gt[i]).sum() / (m | gt[i]).sum()))
        ok += res.status[0] == "ok"
        assert res.backgrounds == "" and res.sufficient is not None
        if res.status[0] == "ok":
            assert res.area[0] <= 3 * shape_area and res.random_pass[0] <= 0.2 and bool(res.sufficient[0])
    assert sorted(ious)[len(ious) // 2] >= 0.5, ious
    assert ok >= 6, ious


class _Reads(nn.Module):
    """Logits = ``rule(relu(x))`` through a 1x1 identity convolution (a layer for Med-CAM to match)."""

    def __init__(self, rule):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.act, self.rule = nn.ReLU(), rule

    def forward(self, x):
        return self.rule(self.act(self.conv(x)))


def test_mask_dependent_fill_counts_where_it_discriminates(planted_model):
    x, _, gt = make_planted(1, seed=7, positive_only=True)
    res = explain(planted_model, x, config=MedCAMConfig(checks=dict(mask_fills=("impute",), mode="full")), seed=0)
    # on the planted square, random blobs fail under imputation too, so it counts beside the others
    assert res.certified_fills[0].split(", ")[-1] == "impute", res.certified_fills
    assert res.status == ["ok"] and bool(res.sufficient[0])


def test_status_null_when_no_fill_is_certified():
    # a classifier that calls class 0 for everything dark: every fill of a dark image gives class 0
    x = torch.rand(2, 1, 16, 16) * 0.3
    res = explain(_Reads(lambda f: torch.stack([1 - f.flatten(1).amax(1), f.flatten(1).amax(1) - 2], 1) * 5), x,
                  config=QUICK)
    assert res.status == ["null_keeps_label", "null_keeps_label"]
    assert "preservation cannot show evidence" in res.reason[0] and res.certified_fills == ["none", "none"]
    assert not res.sufficient.any() and torch.isnan(res.random_pass).all()


def test_status_not_informative_when_random_blobs_pass():
    # a classifier that reads only the mean brightness of a uniform image: a random blob of the
    # mask's area gives exactly the mask's own mean, so it passes whenever the mask does
    x = torch.full((1, 1, 16, 16), 0.9)
    cfg = QUICK.replace(fills=("baseline",), checks=dict(min_area=0.0))
    res = explain(_Reads(lambda f: torch.stack([0.25 - f.flatten(1).mean(1), f.flatten(1).mean(1) - 0.25], 1) * 40),
                  x, config=cfg)
    assert bool(res.sufficient[0]) and res.random_pass[0].item() == 1.0
    assert res.status == ["not_informative"] and "random blobs" in res.reason[0]
    assert res.a_star.shape == (1,) and res.evidence_curve.shape == (1, len(cfg.checks.area_grid))

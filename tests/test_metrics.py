"""medcam_fast.metrics on cases whose answers are known by construction, plus grad-cam's ROAD and
scipy as references where a closed form is not available."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from medcam_fast import metrics as M

from _testing import devices

H = W = 16


class RegionMean(nn.Module):
    """logits = [0, scale * (mean over channels and region R of x) + shift]; R = left half columns."""

    def __init__(self, scale=4.0, shift=0.0, cols=W // 2):
        super().__init__()
        self.scale, self.shift, self.cols = scale, shift, cols

    def forward(self, x):
        m = x[..., : self.cols].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), self.scale * m + self.shift], dim=1)


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def _region_first_saliency(n, device, region_first=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, H, W, generator=g)
    bump = torch.zeros(H, W)
    bump[:, : W // 2] = 1.0
    return (s + (bump if region_first else 1 - bump)).to(device)


# ------------------------------------------------------------------ decision


@pytest.mark.parametrize("device", devices, ids=str)
def test_decision_kept_and_confidence_change_known_probabilities(device):
    f = RegionMean(scale=4.0, shift=-2.0).to(device)  # class 1 iff region mean > 0.5
    x = torch.ones(3, 2, H, W, device=device)
    ev = x.clone()
    ev[1, :, :, :2] = 0   # region mean 6/8
    ev[2, :, :, :6] = 0   # region mean 2/8
    label = torch.tensor([1, 1, 1], device=device)
    assert M.decision_kept(f, ev, label).tolist() == [True, True, False]
    assert M.kept_rate(f, ev, label).item() == pytest.approx(2 / 3)
    got = M.confidence_change(f, x, ev, label, batch_size=2)
    want = [_sig(4 * m - 2) - _sig(2.0) for m in (1.0, 0.75, 0.25)]
    torch.testing.assert_close(got.cpu(), torch.tensor(want), atol=1e-6, rtol=0)
    # an int label broadcasts
    assert M.decision_kept(f, ev, 0).tolist() == [False, False, True]


def test_mask_area_known_fractions():
    m = torch.zeros(2, 4, 5, dtype=torch.bool)
    m[0, :2] = True
    assert M.mask_area(m).tolist() == [0.5, 0.0]
    assert M.mask_area(m[:, None]).tolist() == [0.5, 0.0]  # [N,1,H,W] accepted


def _masks(rows):
    return torch.tensor([[[c == "#" for c in r] for r in rows]])


@pytest.mark.parametrize("device", devices, ids=str)
def test_connected_components_hand_made(device):
    diag = _masks(["#...", ".#..", "..#.", "...#"])
    ring = _masks(["#####", "#...#", "#.#.#", "#...#", "#####"])    # ring + isolated centre
    checker = _masks(["#.#.", ".#.#", "#.#.", ".#.#"])
    spiral = _masks(["#######", "......#", "#####.#", "#...#.#", "#.###.#", "#.....#", "#######"])
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    cases = [(diag, 1, 4), (ring, 2, 2), (checker, 1, 8), (spiral, 1, 1), (empty, 0, 0)]
    for m, c8, c4 in cases:
        m = m.to(device)
        assert M.connected_components(m, 8).item() == c8
        assert M.connected_components(m, connectivity=4).item() == c4
    # batched, mixed sizes padded into one tensor
    batch = torch.zeros(3, 7, 7, dtype=torch.bool, device=device)
    batch[0, :4, :4] = diag[0].to(device)
    batch[1, :5, :5] = ring[0].to(device)
    batch[2] = spiral[0].to(device)
    assert M.connected_components(batch).tolist() == [1, 2, 1]
    assert M.connected_components(batch, 4).tolist() == [4, 2, 1]


def test_connected_components_match_scipy_on_random_masks():
    from scipy import ndimage
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 33, 29, generator=g) < torch.linspace(0.2, 0.7, 12).view(-1, 1, 1)
    for conn, structure in [(8, np.ones((3, 3))), (4, None)]:
        want = [ndimage.label(m.numpy(), structure=structure)[1] for m in masks]
        assert M.connected_components(masks, conn).tolist() == want


def test_decision_bad_inputs_name_the_argument():
    f = RegionMean()
    x = torch.ones(2, 1, H, W)
    with pytest.raises(ValueError, match="mask"):
        M.mask_area(torch.ones(2, H, W))                       # float, not bool
    with pytest.raises(ValueError, match="mask"):
        M.connected_components(torch.ones(H, W, dtype=torch.bool))  # rank 2
    with pytest.raises(ValueError, match="connectivity"):
        M.connected_components(torch.ones(1, H, W, dtype=torch.bool), 6)
    with pytest.raises(ValueError, match="evidence"):
        M.confidence_change(f, x, torch.ones(2, 1, H, W - 1), 1)
    with pytest.raises(ValueError, match="label"):
        M.decision_kept(f, x, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="label"):
        M.decision_kept(f, x, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="label"):
        M.decision_kept(f, x, 5)                                 # >= K
    with pytest.raises(ValueError, match="forward"):
        M.decision_kept(lambda t: t.mean(dim=(1, 2, 3)), x, 1)   # not [B,K]


# ------------------------------------------------------------------ deletion / insertion


def _trapezoid(ys):
    return sum((a + b) / 2 for a, b in zip(ys[:-1], ys[1:])) / (len(ys) - 1)


@pytest.mark.parametrize("device", devices, ids=str)
def test_deletion_curve_matches_closed_form(device):
    f = RegionMean(scale=4.0)
    x = torch.ones(2, 1, H, W, device=device)
    sal = torch.stack([_region_first_saliency(1, device)[0], _region_first_saliency(1, device, False)[0]])
    res = M.deletion(f, x, sal, label=1, steps=8, batch_size=5)
    # step i removes 32*i pixels; the region (128 px) goes first for image 0 and last for image 1
    first = [_sig(4 * max(0, 128 - 32 * i) / 128) for i in range(9)]
    last = [_sig(4 * min(1.0, (256 - 32 * i) / 128)) for i in range(9)]
    torch.testing.assert_close(res.curve.cpu(), torch.tensor([first, last]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.auc.cpu(), torch.tensor([_trapezoid(first), _trapezoid(last)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.fractions.cpu(), torch.arange(9) / 8.0)
    assert res.auc[0] < res.auc[1]
    # chunking does not change the answer
    torch.testing.assert_close(M.deletion(f, x, sal, 1, steps=8, batch_size=64).curve, res.curve)


def test_deletion_ties_follow_raster_order_and_baseline_is_used():
    f = RegionMean(scale=4.0)
    x = torch.ones(1, 1, H, W)
    res = M.deletion(f, x, torch.zeros(1, H, W), 1, steps=4, baseline=0.5)
    want = []
    for i in range(5):
        k = i * H * W // 4
        in_region = sum(1 for j in range(k) if j % W < W // 2)  # removed row by row
        want.append(_sig(4 * (1 - 0.5 * in_region / 128)))
    torch.testing.assert_close(res.curve[0], torch.tensor(want), atol=1e-6, rtol=0)
    # bool saliency = the same ranking as its float twin
    m = torch.zeros(1, H, W, dtype=torch.bool)
    m[0, 3:9, 2:5] = True
    torch.testing.assert_close(M.deletion(f, x, m, 1, steps=5).curve, M.deletion(f, x, m.float(), 1, steps=5).curve)
    with pytest.raises(ValueError, match="baseline"):
        M.deletion(f, x, m, 1, baseline=torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="steps"):
        M.deletion(f, x, m, 1, steps=0)
    with pytest.raises(ValueError, match="saliency"):
        M.deletion(f, x, torch.zeros(1, H, W + 1), 1)


@pytest.mark.parametrize("device", devices, ids=str)
def test_insertion_curve_matches_closed_form_and_default_start_is_blur(device):
    f = RegionMean(scale=4.0)
    x = torch.ones(1, 3, H, W, device=device)
    sal = _region_first_saliency(1, device)
    res = M.insertion(f, x, sal, 1, steps=8, start=0.0)
    want = [_sig(4 * min(1.0, 32 * i / 128)) for i in range(9)]
    torch.testing.assert_close(res.curve[0].cpu(), torch.tensor(want), atol=1e-6, rtol=0)
    assert res.auc.item() == pytest.approx(_trapezoid(want), abs=1e-6)
    # the blur of a constant image is that image, so the default insertion curve is flat at p(x)
    flat = M.insertion(f, 0.3 * x, sal, 1, steps=4)
    torch.testing.assert_close(flat.curve.cpu(), torch.full((1, 5), _sig(1.2)), atol=1e-6, rtol=0)
    # the blur keeps the mean of a smooth ramp's interior and really smooths an impulse
    imp = torch.zeros(1, 1, 21, 21)
    imp[0, 0, 10, 10] = 1
    b = M.gaussian_blur(imp)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-6) and b.max().item() < 0.05


# ------------------------------------------------------------------ ROAD


def _gradcam_road():
    import pytorch_grad_cam.metrics.road

    return pytorch_grad_cam.metrics.road


@pytest.mark.parametrize("device", devices, ids=str)
def test_linear_imputation_reproduces_a_ramp_exactly(device):
    # a linear image is its own weighted neighbour average (symmetric weights) away from the border
    i = torch.arange(20.0, dtype=torch.float64).view(-1, 1)
    j = torch.arange(20.0, dtype=torch.float64).view(1, -1)
    x = torch.stack([0.3 + 0.01 * i - 0.02 * j, 0.1 - 0.005 * i + 0.03 * j]).unsqueeze(0).to(device)
    keep = torch.ones(1, 20, 20, dtype=torch.bool, device=device)
    keep[0, 3:15, 4:12] = False
    keep[0, 16, 16] = False
    torch.testing.assert_close(M.noisy_linear_impute(x, keep, noise=0.0), x, atol=1e-9, rtol=0)
    x32 = x.float()
    torch.testing.assert_close(M.noisy_linear_impute(x32, keep, noise=0.0), x32, atol=1e-6, rtol=0)
    # and a border hole is not the ramp (weights renormalise over in-image neighbours only)
    keep[0, 0, 0] = False
    assert (M.noisy_linear_impute(x, keep, noise=0.0)[0, :, 0, 0] - x[0, :, 0, 0]).abs().min() > 1e-3


def test_imputation_noise_only_on_removed_pixels_with_the_given_std():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 24, 24, generator=g)
    keep = torch.rand(4, 24, 24, generator=g) > 0.5
    clean = M.noisy_linear_impute(x, keep, noise=0.0)
    noisy = M.noisy_linear_impute(x, keep, noise=0.05, generator=torch.Generator().manual_seed(3))
    again = M.noisy_linear_impute(x, keep, noise=0.05, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    kept = keep[:, None].expand_as(x)
    assert torch.equal(noisy[kept], x[kept]) and torch.equal(clean[kept], x[kept])
    d = (noisy - clean)[~kept]
    assert d.std().item() == pytest.approx(0.05, rel=0.05) and abs(d.mean().item()) < 0.005


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # grad-cam's numpy calls on torch tensors
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 5e-7)])
def test_imputation_matches_gradcam_noisy_linear_imputer(dtype, atol):
    gc = _gradcam_road()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 23, generator=g)
    keep = torch.stack([torch.rand(20, 23, generator=g) > 0.5, torch.rand(20, 23, generator=g) > 0.9,
                        torch.ones(20, 23, dtype=torch.bool)])
    keep[2, 1:19, 2:20] = False  # one big hole touching nothing but a 1-2 px frame
    keep[2, 5, 0] = False        # a removed pixel on the image border
    ref = torch.stack([gc.NoisyLinearImputer(noise=0.0)(x[i], keep[i].float()) for i in range(3)])
    out = M.noisy_linear_impute(x.to(dtype), keep, noise=0.0)
    # grad-cam returns float32 (spsolve in float64): the float64 bound is float32 rounding
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_imputation_large_hole_float32_matches_gradcam():
    # float32 search directions with a float64 solution and residual keep ~1e-6 on a 124 px hole
    gc = _gradcam_road()
    x = torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(1, 128, 128, dtype=torch.bool)
    keep[0, 2:126, 2:126] = False
    ref = gc.NoisyLinearImputer(noise=0.0)(x[0], keep[0].float())
    torch.testing.assert_close(M.noisy_linear_impute(x, keep, noise=0.0)[0], ref, atol=1e-6, rtol=0)


def test_road_masks_follow_numpy_percentile_thresholds():
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(2, 20, 20, generator=g)
    tied = torch.randint(0, 4, (2, 20, 20), generator=g).float()   # thresholds land on data values
    ps = [10, 30, 50, 90]
    for smap in (sal, tied):
        for order, s in [("morf", smap), ("lerf", 1 - smap)]:
            rm = M.road_masks(smap, ps, order)
            assert rm.shape == (2, 4, 20, 20)
            for i in range(2):
                for k, r in enumerate(ps):
                    t = np.percentile(s[i].numpy(), 100 - r)   # grad-cam's percentile = share kept
                    want = ~(s[i].numpy() < t)
                    assert np.array_equal(rm[i, k].numpy(), want)
    # 400 pixels, r=30: index 399*0.7 = 279.3, so 280 kept and the 120 highest removed
    rm = M.road_masks(sal, [30], "morf")[0, 0].flatten()
    assert rm.sum().item() == 120
    assert rm[sal[0].flatten().argsort(descending=True)[:120]].all()
    with pytest.raises(ValueError, match="percentiles"):
        M.road_masks(sal, [0, 50])
    with pytest.raises(ValueError, match="order"):
        M.road_masks(sal, [50], "random")


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(128, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(6.0)  # sharper logits, so perturbations move the scores
    return net.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("score", ["prob", "logit"])
def test_road_matches_gradcam_with_noise_disabled(score, monkeypatch):
    gc = _gradcam_road()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    class NoNoise(gc.NoisyLinearImputer):  # grad-cam builds its imputer with noise=0.01 internally
        def __init__(self, *args, **kwargs):
            super().__init__(noise=0.0)

    monkeypatch.setattr(gc, "NoisyLinearImputer", NoNoise)
    net = _small_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 20, generator=g)
    sal = torch.rand(3, 20, 20, generator=g)
    label = net(x).argmax(dim=1)
    target = ClassifierOutputSoftmaxTarget if score == "prob" else ClassifierOutputTarget
    targets = [target(int(c)) for c in label]
    cams = sal.numpy()
    ref_m = gc.ROADMostRelevantFirstAverage()(x, cams, targets, net)
    ref_l = gc.ROADLeastRelevantFirstAverage()(x, cams, targets, net)
    ref_c = gc.ROADCombined()(x, cams, targets, net)
    assert np.abs(ref_m).min() > 1e-3  # the comparison is not between near-zeros
    res = M.road(net, x, sal, label, noise=0.0, score=score, batch_size=7)
    atol = 1e-5 if score == "prob" else 1e-4
    np.testing.assert_allclose(res.morf.numpy(), ref_m, atol=atol, rtol=0)
    np.testing.assert_allclose(res.lerf.numpy(), ref_l, atol=atol, rtol=0)
    np.testing.assert_allclose(res.combined.numpy(), ref_c, atol=atol, rtol=0)
    # per percentage too (grad-cam's percentile p keeps p%, i.e. removes 100-p%)
    for k, r in enumerate([10, 50, 90]):
        one = gc.PerturbationConfidenceMetric(gc.RemoveMostRelevantFirst(100 - r, NoNoise()))(x, cams, targets, net)
        np.testing.assert_allclose((res.morf_curve - res.base[:, None])[:, 4 * k].numpy(), one, atol=atol, rtol=0)


def test_road_on_region_classifier_orders_and_bad_input():
    # the score depends only on the left half; a map ranking it first must drop faster under MoRF
    f = RegionMean(scale=6.0, shift=-3.0)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1, H, W)
    x[..., : W // 2] = 1.0
    x = x + 0.05 * torch.rand(x.shape, generator=g)
    good = _region_first_saliency(2, "cpu")
    bad = _region_first_saliency(2, "cpu", region_first=False)
    rg = M.road(f, x, good, 1, noise=0.0)
    rb = M.road(f, x, bad, 1, noise=0.0)
    assert (rg.morf < rb.morf).all() and (rg.lerf > rb.lerf).all() and (rg.combined > rb.combined).all()
    assert rg.morf_curve.shape == (2, 9) and rg.percentiles.tolist() == [10.0 * i for i in range(1, 10)]
    with pytest.raises(ValueError, match="noise"):
        M.noisy_linear_impute(x, good > 1, noise=-1.0)
    with pytest.raises(ValueError, match="keep"):
        M.noisy_linear_impute(x, good)  # float, not bool
    with pytest.raises(ValueError, match="score"):
        M.road(f, x, good, 1, score="probability")


# ------------------------------------------------------------------ localisation


def test_iou_dice_known_overlap_and_thresholding():
    gt = torch.zeros(3, H, W, dtype=torch.bool)
    pred = torch.zeros(3, H, W, dtype=torch.bool)
    gt[0, :8] = True
    pred[0, 4:12] = True          # |P&G| = 64, |P|G| = 192
    gt[1, :8] = True              # empty prediction
    torch.testing.assert_close(M.iou(pred, gt)[:2], torch.tensor([1 / 3, 0.0]))
    torch.testing.assert_close(M.dice(pred, gt)[:2], torch.tensor([0.5, 0.0]))
    assert math.isnan(M.iou(pred, gt)[2]) and math.isnan(M.dice(pred, gt)[2])  # both empty
    # an affine float map binarised at 0.5 after min-max normalisation gives the same mask
    soft = 3.0 * pred.float() + 2.0
    torch.testing.assert_close(M.iou(soft[:1], gt[:1], threshold=0.5), torch.tensor([1 / 3]))
    assert torch.equal(M.binarise(pred, threshold=0.9), pred)  # bool passes through
    assert not M.binarise(torch.full((1, 4, 4), 7.0), 0.0).any()  # constant map -> empty
    with pytest.raises(ValueError, match="threshold"):
        M.iou(soft, gt)
    with pytest.raises(ValueError, match="gt"):
        M.iou(pred, gt.float())
    with pytest.raises(ValueError, match="pred"):
        M.iou(pred[:2], gt)


def test_hit_rate_and_tie_rules():
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[:, 4:, 4:] = True
    s = torch.zeros(3, 8, 8)
    s[0, 5, 5] = 1.0                     # inside
    s[1, 1, 1] = 1.0                     # outside
    s[2, 1, 1] = s[2, 6, 6] = 1.0        # tie: first (raster) outside, second inside
    assert M.hit_rate(s, gt).tolist() == [1.0, 0.0, 0.0]
    assert M.hit_rate(s, gt, ties="any").tolist() == [1.0, 0.0, 1.0]
    assert M.hit_rate(s, gt, ties="all").tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(M.hit_rate(s[:1], torch.zeros(1, 8, 8, dtype=torch.bool))[0])
    with pytest.raises(ValueError, match="ties"):
        M.hit_rate(s, gt, ties="mean")


def test_pointing_game_tolerance_is_an_open_disc():
    gt = torch.zeros(5, 40, 40, dtype=torch.bool)
    gt[:, 10, 10] = True
    s = torch.zeros(5, 40, 40)
    s[0, 10, 24] = 1.0   # distance 14 -> hit
    s[1, 10, 25] = 1.0   # distance 15 -> miss (strict, as TorchRay)
    s[2, 19, 22] = 1.0   # 9^2 + 12^2 = 15^2 -> miss
    s[3, 18, 21] = 1.0   # 8^2 + 11^2 = 185 < 225 -> hit
    s[4, 10, 10] = 1.0   # on the GT
    assert M.pointing_game(s, gt).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert M.pointing_game(s, gt, tolerance=16).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert M.pointing_game(s, gt, tolerance=1).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="tolerance"):
        M.pointing_game(s, gt, tolerance=float("inf"))


def test_tune_threshold_picks_the_miou_maximiser():
    gt = torch.zeros(2, H, W, dtype=torch.bool)
    gt[:, 5:9, 5:9] = True                  # 16 px
    s = torch.zeros(2, H, W)
    s[0, 4:10, 4:10] = 0.6                  # ring of 20 px at 0.6 ...
    s[0, 5:9, 5:9] = 1.0                    # ... around the GT at 1.0
    s[1, 5:9, 5:9] = 0.5                    # GT at 0.5 and one hot pixel elsewhere at 1.0
    s[1, 0, 15] = 1.0
    # t=0.4: IoUs 16/36 and 16/17 (mean .693); t=0.7: 1 and 0 (mean .5)
    assert M.tune_threshold(s, gt, [0.4, 0.7]) == 0.4
    assert M.tune_threshold(s[:1], gt[:1], [0.4, 0.7]) == 0.7
    assert M.tune_threshold(s[:1], gt[:1], [0.7, 0.8]) == 0.7   # tie -> first
    assert M.tune_threshold(s, gt) == pytest.approx(0.2)         # CheXlocalize's candidates 0.2..0.7
    with pytest.raises(ValueError, match="saliency_val"):
        M.tune_threshold(s > 0.5, gt)


# ------------------------------------------------------------------ sanity check


def test_spearman_matches_scipy_with_ties():
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 6, 7), generator=g).float()
    b = a + torch.randint(0, 3, (4, 6, 7), generator=g).float()
    b[3] = torch.rand(6, 7, generator=g) > 0.5   # bool-like map with heavy ties
    got = M.spearman(a, b)
    want = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert math.isnan(M.spearman(torch.ones(1, 3, 3), a[:1, :3, :3])[0])


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 12 * 12, 3)).eval()


def _intensity_map(model, x, label):
    return x.mean(dim=1)  # ignores the model entirely


def _input_gradient_map(model, x, label):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, label[:, None]).sum().backward()
    return x.grad.abs().sum(dim=1)


def test_cascading_randomisation_flags_a_model_independent_map():
    net = _tiny_classifier()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([0, 1, 2, 0])
    out = M.cascading_randomisation(net, _intensity_map, x, label)
    assert [o["stage"] for o in out] == ["5", "2", "0"]   # output layer first
    assert out[-1]["randomised"] == ["5", "2", "0"]
    for o in out:
        assert torch.equal(o["iou"], torch.ones(4))
        torch.testing.assert_close(o["spearman"], torch.ones(4, dtype=torch.float64))
    grad = M.cascading_randomisation(net, _input_gradient_map, x, label, seed=0)
    # a gradient map depends on the weights: once everything is random it is unrelated
    assert grad[-1]["spearman"].abs().max() < 0.5 and grad[-1]["iou"].max() < 0.5
    # the caller's model and global RNG are untouched; the same seed gives the same answer
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    again = M.cascading_randomisation(net, _input_gradient_map, x, label, seed=0)
    assert torch.equal(again[-1]["spearman"], grad[-1]["spearman"])
    with pytest.raises(ValueError, match="stages"):
        M.cascading_randomisation(net, _intensity_map, x, label, stages=[["head"]])
    with pytest.raises(ValueError, match="explain_fn"):
        M.cascading_randomisation(net, lambda m, x, y: x[:, 0, :5], x, label)  # wrong size

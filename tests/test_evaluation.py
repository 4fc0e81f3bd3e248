"""Evaluation harness: sufficiency measures with known answers, and a small resumable run."""
import json

import pytest
import torch
from torch import nn

from medcam_fast import MedCAMConfig
from medcam_fast.evaluation import (EvalOptions, EvalSet, Evaluation, area_to_sufficiency, example_grid, example_maps,
                                    kept_robust_of_masks, pick_backgrounds, sufficiency_curve, write_report)

from planted import make_planted, train_tiny_cnn


class RegionClassifier(nn.Module):
    """Class 1 when the mean of the top-left 4x4 block exceeds 0.5, by construction."""

    def forward(self, x):
        s = x[:, 0, :4, :4].mean(dim=(1, 2)) - 0.5
        return torch.stack([-s, s], dim=1) * 10


def test_pick_backgrounds_only_other_labels():
    pool = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    bg = pick_backgrounds(pool, labels, torch.tensor([0, 2]), k=5)
    assert bg.shape == (2, 5, 1, 2, 2)
    assert set(bg[0, :, 0, 0, 0].tolist()) <= {1.0, 3.0, 4.0, 5.0}   # never a label-0 image
    assert set(bg[1, :, 0, 0, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(ValueError, match="no image with a label other than 0"):
        pick_backgrounds(pool[:1], labels[:1], torch.tensor([0]), k=2)


def test_kept_robust_and_curve_known_answers():
    model = RegionClassifier()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :4, :4] = 1.0                                   # class 1 because of the corner
    bgs = torch.zeros(1, 8, 1, 8, 8)                         # class-0 backgrounds
    corner = torch.zeros(1, 8, 8, dtype=torch.bool)
    corner[0, :4, :4] = True
    label = torch.tensor([1])
    assert kept_robust_of_masks(model, x, label, corner, bgs).item() == 1.0
    assert kept_robust_of_masks(model, x, label, ~corner, bgs).item() == 0.0
    half = torch.zeros(1, 8, 8, dtype=torch.bool)
    half[0, :2, :4] = True                                  # half the corner: mean 0.5, not > 0.5
    assert kept_robust_of_masks(model, x, label, half, bgs).item() == 0.0
    # a saliency ranking the corner first: 16 px = 25% of the image is needed
    sal = corner.float() + 0.01 * torch.rand(1, 8, 8)
    curve = sufficiency_curve(model, x, label, sal, bgs, areas=(0.1, 0.25, 0.5))
    assert curve.tolist() == [[0.0, 1.0, 1.0]]
    assert area_to_sufficiency(curve, areas=(0.1, 0.25, 0.5)).tolist() == [0.25]
    assert area_to_sufficiency(torch.zeros(1, 3), areas=(0.1, 0.25, 0.5)).tolist() == [1.0]


def test_small_evaluation_run_resumes(tmp_path):
    model = train_tiny_cnn(seed=0)
    x, _, gt = make_planted(6, seed=41, positive_only=True)
    xv, _, gtv = make_planted(6, seed=42, positive_only=True)
    xp, yp, _ = make_planted(40, seed=43)
    data = EvalSet("planted", x, [f"img{i}" for i in range(6)], gt, xp[yp == 0][:12], xv, gtv)
    opts = EvalOptions(methods=("medcam", "gradcam"), batch=3, n_robust=4,
                       medcam=MedCAMConfig(steps=40, min_steps=20, check_every=10))
    calls = []
    ev = Evaluation(model, data, tmp_path, opts, progress=lambda m, n: calls.append((m, n)))
    records = ev.run()
    assert len(records) == 12 and calls == [("medcam", 3), ("medcam", 3), ("gradcam", 3), ("gradcam", 3)]
    r = next(r for r in records if r["method"] == "gradcam")
    for key in ("kept", "prob_change", "area", "deletion_auc", "insertion_auc", "road", "hit", "iou",
                "seconds", "kept_robust", "area_to_sufficiency", "kept_robust_at_medcam_area"):
        assert key in r, key
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 12
    # a second run reads the finished records back and recomputes nothing
    calls.clear()
    again = Evaluation(model, data, tmp_path, opts, progress=lambda m, n: calls.append((m, n))).run()
    assert calls == [] and len(again) == 12
    # the example grid re-explains the first images with the run's settings: Med-CAM's masks match
    shown = example_maps(ev, ("medcam", "gradcam"), n=3)
    assert shown["medcam"][1].shape == (3, 64, 64) and shown["gradcam"][0].shape == (3, 64, 64)
    areas = [ev.done[("medcam", f"img{i}")]["area"] for i in range(3)]
    assert torch.allclose(shown["medcam"][1].float().mean((1, 2)), torch.tensor(areas), atol=0.02)
    grid = example_grid(x[:3], gt[:3], data.ids[:3], shown, tmp_path)
    summary = write_report(again, tmp_path, "test", ["fact"], extra_figures=[grid])
    assert set(summary) == {"medcam", "gradcam"} and summary["medcam"]["n"] == 6
    text = (tmp_path / "results.md").read_text()
    assert "| medcam |" in text and (tmp_path / "sufficiency_curve.png").stat().st_size > 0
    assert "![examples.png](examples.png)" in text and (tmp_path / "examples.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["gradcam"]["n"] == 6


def test_patchnet_saliency_is_a_method(tmp_path):
    from medcam_fast.patchnet import PatchNet

    # a fixed backbone: a patch scores class 1 by how far its brightest 3x3 block exceeds 0.7 (only the
    # filled square does); class 0 is a constant 0.05, so images with the square are class 1
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [10.0]]))
        head.bias.copy_(torch.tensor([0.05, -7.0]))
    backbone = nn.Sequential(nn.AvgPool2d(3, stride=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), head, nn.ReLU())
    model = PatchNet(backbone, 16, 2, 1).eval()
    x, _, gt = make_planted(4, seed=51, positive_only=True)
    xp, yp, _ = make_planted(24, seed=52)
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == [1, 1, 1, 1] and set(model(xp).argmax(1).tolist()) == {0, 1}
    data = EvalSet("planted", x, [f"p{i}" for i in range(4)], gt, xp, x, gt)
    ev = Evaluation(model, data, tmp_path, EvalOptions(methods=("patchnet_raw", "patchnet_smooth"), batch=4,
                                                       n_robust=2))
    records = ev.run()
    assert {r["method"] for r in records} == {"patchnet_raw", "patchnet_smooth"} and len(records) == 8
    assert json.loads((tmp_path / "thresholds.json").read_text()).keys() == {"patchnet_raw", "patchnet_smooth"}
    # the square's patch has the highest logit: its (blocky) map points at the square within 15 px
    assert all(r["pointing"] == 1.0 for r in records if r["method"] == "patchnet_raw")

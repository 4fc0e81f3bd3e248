"""Evaluation harness: sufficiency measures with known answers, and a small resumable run."""
import copy
import json

import pytest
import torch
from torch import nn

from medcam_fast import MedCAMConfig
from medcam_fast.evaluation import (EvalOptions, EvalSet, Evaluation, area_to_sufficiency, example_grid, example_maps,
                                    evidence_curve, kept_robust_of_masks, pick_backgrounds, write_evaluation_report)
from medcam_fast.medcam import sufficiency
from medcam_fast.runstate import ManifestMismatch

from planted import CornerClassifier, make_planted, train_tiny_cnn


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
    model = CornerClassifier()
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
    # a saliency ranking the corner first: 16 px = 25% of the image is needed under the blank
    # fill; the mean fill (0.25) would let 6 corner pixels pass, but every counted fill must hold
    sal = corner.float() + 0.01 * torch.rand(1, 8, 8)
    fills = sufficiency.certify(model, x, label, ("baseline", "mean"), 0.0, 1.0)
    assert fills.certified.tolist() == [[True, True]]
    ok, prob = evidence_curve(model, x, label, sal, fills, 0.25, areas=(0.1, 0.25, 0.5))
    assert ok.tolist() == [[False, True, True]]
    assert area_to_sufficiency(ok, areas=(0.1, 0.25, 0.5)).tolist() == [0.25]
    assert area_to_sufficiency(torch.zeros(1, 3, dtype=torch.bool), areas=(0.1, 0.25, 0.5)).tolist() == [1.0]


@pytest.mark.slow
def test_small_evaluation_run_resumes(tmp_path):
    model = train_tiny_cnn(seed=0)
    x, _, gt = make_planted(6, seed=41, positive_only=True)
    xv, _, gtv = make_planted(6, seed=42, positive_only=True)
    xp, yp, _ = make_planted(40, seed=43)
    data = EvalSet("planted", x, [f"img{i}" for i in range(6)], gt, xp[yp == 0][:12], xv, gtv)
    opts = EvalOptions(methods=("medcam", "gradcam"), batch=3, n_robust=4,
                       medcam=MedCAMConfig(steps=40, fit=dict(min_steps=20, check_every=10)))
    calls = []
    ev = Evaluation(model, data, tmp_path, opts, progress=lambda m, n: calls.append((m, n)))
    records = ev.run()
    assert len(records) == 12 and calls == [("medcam", 3), ("medcam", 3), ("gradcam", 3), ("gradcam", 3)]
    r = next(r for r in records if r["method"] == "gradcam")
    for key in ("kept", "prob_change", "area", "deletion_auc", "insertion_auc", "road", "hit", "iou",
                "seconds", "kept_robust", "area_to_sufficiency", "sufficient_at_medcam_area", "sufficient",
                "flipped_when_removed", "random_pass", "precision_at_a_star", "evidence_curve"):
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
    summary = write_evaluation_report(again, tmp_path, "test", ["fact"], extra_figures=[grid])
    assert set(summary) == {"medcam", "gradcam"} and summary["medcam"]["n"] == 6
    text = (tmp_path / "results.md").read_text()
    assert "| medcam |" in text and (tmp_path / "evidence_curve.png").stat().st_size > 0
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
    # another classifier's cached thresholds in the same folder are never read as this one's
    (tmp_path / "thresholds.json").write_text(json.dumps({"0123456789abcdef": {"patchnet_raw": 99.0}}))
    opts = EvalOptions(methods=("patchnet_raw", "patchnet_smooth"), batch=4, n_robust=2)
    ev = Evaluation(model, data, tmp_path, opts)
    records = ev.run()
    assert {r["method"] for r in records} == {"patchnet_raw", "patchnet_smooth"} and len(records) == 8
    cache = json.loads((tmp_path / "thresholds.json").read_text())
    assert cache["0123456789abcdef"] == {"patchnet_raw": 99.0}
    assert cache[ev.fingerprint].keys() == {"patchnet_raw", "patchnet_smooth"}
    assert {r["threshold"] for r in records if r["method"] == "patchnet_raw"} != {99.0}
    # a resume with another classifier or seed is refused, naming what differs; the same settings resume
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.backbone[3].bias.add_(0.01)
    with pytest.raises(ManifestMismatch, match="classifier"):
        Evaluation(other, data, tmp_path, opts)
    with pytest.raises(ManifestMismatch, match="seed: 0 in the folder, 1 now"):
        Evaluation(model, data, tmp_path, EvalOptions(methods=opts.methods, batch=4, n_robust=2, seed=1))
    assert len(Evaluation(model, data, tmp_path, opts).done) == 8
    # the square's patch has the highest logit: its (blocky) map points at the square within 15 px
    assert all(r["pointing"] == 1.0 for r in records if r["method"] == "patchnet_raw")


def _tiny_brain_mri(root, per_split=(("test", 3), ("val", 12)), size=48, disc=160):
    """A brain_mri-format folder (split.csv, images/<class>/, masks/<class>/) of generated images:
    a bright disc (the "tumour", also its mask; intensity up to ``disc`` + 80) on noise; the class
    sets the disc's corner."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    classes = ("glioma", "meningioma", "pituitary")
    rows, k = ["id,label,split,image,mask"], 0
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for split, n in per_split:
        for i in range(n):
            label = classes[i % 3]
            cy, cx = [(12, 12), (12, 36), (36, 24)][i % 3]
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
            img = (torch.rand(size, size, generator=g) * 80 + inside * disc).clamp(0, 255).to(torch.uint8)
            for sub in ("images", "masks"):
                (root / sub / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(root / "images" / label / f"{k}.jpg")
            Image.fromarray((inside * 255).to(torch.uint8).numpy()).save(root / "masks" / label / f"{k}.png")
            rows.append(f"{k},{label},{split},images/{label}/{k}.jpg,masks/{label}/{k}.png")
            k += 1
    (root / "split.csv").write_text("\n".join(rows) + "\n")


def _tiny_card(weights_dir, name="tiny_brain", size=48):
    """An untrained timm classifier with a model card, as benchmarks/train_classifier.py writes them."""
    from safetensors.torch import save_file

    from medcam_fast.zoo import build_model

    spec = {"arch": "resnet10t", "num_classes": 3, "in_chans": 1, "input_size": [1, size, size], "mean": [0.3],
            "std": [0.25], "patch_size": 0}
    torch.manual_seed(0)
    model = build_model(spec)
    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(weights_dir / f"{name}.safetensors"))
    card = {"name": name, "model": spec, "class_names": ["glioma", "meningioma", "pituitary"],
            "metrics": {"test": {"accuracy": 0.0, "balanced_accuracy": 0.0}, "val": {}}}
    (weights_dir / f"{name}.json").write_text(json.dumps(card))
    return name


@pytest.mark.slow
def test_evaluate_command_end_to_end(tmp_path, capsys):
    # `medcam-fast evaluate` on a generated brain_mri-format folder and an untrained classifier:
    # every method scores every test image, the report and records are written, a rerun resumes
    from medcam_fast import cli

    data, out = tmp_path / "brain_mri", tmp_path / "report"
    _tiny_brain_mri(data)
    name = _tiny_card(tmp_path / "weights")
    argv = ["evaluate", "--dataset", "brain_mri", "--data", str(data), "--classifier", name,
            "--weights-dir", str(tmp_path / "weights"), "--out", str(out), "--n", "3",
            "--methods", "medcam,gradcam", "--sanity-images", "0", "--batch", "3", "--judge-steps", "3",
            "--pool-size", "8",
            "--tune-size", "4"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["id"]) for r in records) == sorted(
        (m, f"brain_{i}") for m in ("medcam", "gradcam") for i in range(3))
    for r in records:
        assert 0.0 <= r["area"] <= 1.0 and r["kept"] in (True, False) and r["judge_kept"] in (True, False)
        assert 0.0 <= r["blob_kept"] <= 1.0 and r["blob_judge_kept"] in (0.0, 1.0)
    assert len(list(out.glob("judge-*-3steps-seed0.safetensors"))) == 1   # keyed by the classifier
    report = (out / "results.md").read_text()
    assert "| medcam | 3 |" in report and "| gradcam | 3 |" in report and "resnet10t" in report
    assert json.loads((out / "results.json").read_text())
    assert (out / "examples.png").is_file() and (out / "evidence_curve.png").is_file()
    assert "medcam" in capsys.readouterr().out                  # the summary table is printed
    assert cli.main(argv) == 0                                   # resumes: nothing is recomputed
    assert (out / "records.jsonl").read_text().count("\n") == len(records)
    # too few val images for the pool and the thresholds: a clear error, not a crash
    assert cli.main(argv[:-4] + ["--pool-size", "64", "--tune-size", "4", "--out", str(tmp_path / "again")]) == 2
    assert "no val images beyond the 12 already used" in capsys.readouterr().err


@pytest.mark.slow
def test_amortised_rows(tmp_path):
    from medcam_fast import amortised as am

    model = train_tiny_cnn(seed=0)
    xt, _, _ = make_planted(128, seed=5)
    path = am.save(am.train_explainer(model, xt, MedCAMConfig(), am.AmortisedRecipe(
        steps=60, batch=16, widths=(8, 16, 32), scale=1, lr=3e-3), progress=False), tmp_path / "ex.safetensors")
    x, _, gt = make_planted(4, seed=41, positive_only=True)
    xp, yp, _ = make_planted(40, seed=43)
    data = EvalSet("planted", x, [f"img{i}" for i in range(4)], gt, xp[yp == 0][:12])
    opts = EvalOptions(methods=("amortised", "amortised+refine"), batch=2, n_robust=4, explainer=str(path), refine=3)
    ev = Evaluation(model, data, tmp_path / "run", opts)
    records = ev.run()
    by = {m: [r for r in records if r["method"] == m] for m in opts.methods}
    assert [len(v) for v in by.values()] == [4, 4]
    from medcam_fast.evaluation.examples import example_maps

    shown = example_maps(ev, list(opts.methods), 2)    # the report's figure: Med-CAM rows, not CAMs
    assert set(shown) == set(opts.methods) and shown["amortised"][1].shape == (2, 64, 64)
    assert {r["steps"] for r in by["amortised"]} == {0}
    assert {r["steps"] for r in by["amortised+refine"]} == {3}
    assert all("status" in r and "sufficient" in r for r in records)
    with pytest.raises(ValueError, match="needs an amortised explainer"):
        Evaluation(model, data, tmp_path / "run2", EvalOptions(methods=("amortised",), batch=2, n_robust=4)).run()


def test_a_half_written_last_record_is_dropped_and_redone(tmp_path):
    """A run killed mid-write leaves a partial last line in records.jsonl: resume drops it, cuts it
    from the file (the next append starts a clean line) and keeps the complete records."""
    from medcam_fast.evaluation.runner import _load_done

    path = tmp_path / "records.jsonl"
    good = ['{"method": "medcam", "id": "a", "v": 1}', '{"method": "medcam", "id": "b", "v": 2}']
    path.write_text("\n".join(good) + '\n{"method": "medcam", "id": "c", "v"')
    done = _load_done(path)
    assert set(done) == {("medcam", "a"), ("medcam", "b")}
    assert path.read_text() == "\n".join(good) + "\n"
    with open(path, "a") as f:
        f.write('{"method": "medcam", "id": "c", "v": 3}\n')
    assert set(_load_done(path)) == {("medcam", "a"), ("medcam", "b"), ("medcam", "c")}
    path.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        _load_done(path)

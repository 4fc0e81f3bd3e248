"""The known-evidence suite: planted shortcuts, cases and their oracle facts, the perturbation
baselines, pass counting, the suite's cases and report, and the leave-one-case-out protocol, on
tiny generated cases with known answers (hand-set classifiers, no training)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from medcam_fast import MedCAMConfig, metrics
from medcam_fast.baselines.perturbation import (HARNESS_METHODS, fill_of, integrated_gradients_maps,
                                                occlusion_geometry, occlusion_maps, perturbation_maps, rise_maps,
                                                rise_masks)
from medcam_fast.data.shortcuts import SHORTCUTS, area, dilate, get_shortcut, plant_like_training
from medcam_fast.evaluation import EvalOptions, EvalSet, Evaluation
from medcam_fast.evaluation.cases import acting_sides, build_shortcut_cases, oracle_facts
from medcam_fast.evaluation.loco import choose, leave_one_case_out, needed_test_runs
from medcam_fast.evaluation.suite import CASES, get_case, split_cases
from medcam_fast.evaluation.suite_report import case_card_markdown, method_row, suite_table
from medcam_fast.models.passes import PassCounter, head_module

from _testing import devices
from planted import MARK_VALUE, TwoCueClassifier, make_two_cue

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("kind", sorted(SHORTCUTS))
def test_shortcut_marks_are_exact_small_and_seeded(kind):
    sc = get_shortcut(kind)
    chans = sc.channels[-1]
    masks = sc.masks(32, 64, torch.Generator().manual_seed(3))
    again = sc.masks(32, 64, torch.Generator().manual_seed(3))
    assert masks.shape == (32, 64, 64) and masks.dtype == torch.bool and torch.equal(masks, again)
    assert (masks.flatten(1).sum(1) > 0).all()
    assert 0.005 < area(sc, 64) < 0.02 and area(sc, 64, dilation=2) > area(sc, 64)
    x = torch.full((32, chans, 64, 64), 0.25)
    value = sc.value(chans, mean=[0.5] * chans, std=[0.25] * chans)
    assert torch.allclose(value, (torch.tensor(sc.colour).expand(chans) - 0.5) / 0.25)
    out = sc.draw(x, masks, value)
    m = masks[:, None].expand_as(x)
    assert torch.equal(out[m], value.view(1, -1, 1, 1).expand_as(x)[m]) and (out[~m] == 0.25).all()
    assert (x == 0.25).all()                                            # a copy


def test_shortcut_errors():
    with pytest.raises(ValueError, match="unknown shortcut"):
        get_shortcut("ruler_of_doom")
    with pytest.raises(ValueError, match="3"):
        get_shortcut("ink_arc").value(1)                                # colour needs RGB
    with pytest.raises(ValueError, match="square"):
        get_shortcut("tag").draw(torch.zeros(1, 1, 8, 4), torch.zeros(1, 8, 4, dtype=torch.bool), torch.ones(1))


def test_plant_like_training_rates():
    x = torch.zeros(2000, 1, 32, 32)
    labels = torch.tensor([0, 1]).repeat(1000)
    out = plant_like_training(x, labels, get_shortcut("text"), 1, 0.5, 0.0, torch.ones(1), torch.Generator().manual_seed(0))
    marked = (out.flatten(1) > 0).any(1)
    assert not marked[labels == 0].any() and 0.45 < marked[labels == 1].float().mean() < 0.55


def _two_cue_cases(needs_lesion: bool, n: int = 12):
    model = TwoCueClassifier(needs_lesion)
    x, lesion = make_two_cue(n, seed=1)
    x[: n // 4] = 0.1 * x[: n // 4].clamp(-0.3, 0.3)          # a quarter without lesion texture
    labels = torch.zeros(n, dtype=torch.long)
    cases = build_shortcut_cases(model, x, labels, lesion, [f"i{i}" for i in range(n)], get_shortcut("tag"), 1,
                                 torch.tensor([MARK_VALUE]), seed=0)
    return model, cases


def test_cases_are_the_flipped_images_and_the_mark_is_the_ground_truth():
    model, cases = _two_cue_cases(needs_lesion=True)
    assert cases.eligible == 12 and cases.flipped == 9 and len(cases.ids) == 9    # no lesion: no flip
    assert "i0" not in cases.ids and cases.call.tolist() == [1] * 9 and cases.label.tolist() == [0] * 9
    bright = cases.x[:, 0] > 1.5
    assert torch.equal(dilate(bright), cases.gt)
    assert model(cases.x).argmax(1).tolist() == [1] * 9


def test_oracle_necessary_but_not_sufficient_alone():
    model, cases = _two_cue_cases(needs_lesion=True)
    o = oracle_facts(model, cases.x, cases.call, cases.gt, MedCAMConfig(), seed=0)
    s = o.summary(cases.flip_rate)
    assert s["testable"] == 1.0
    assert s["necessary"] == 1.0 and s["sufficient_alone"] == 0.0        # removing it flips; alone it does not keep
    assert s["random_necessary"] <= 0.1 and s["random_sufficient"] <= 0.1
    assert s["acts_on"] == ["necessary"] and s["flip_rate"] == 0.75


def test_oracle_sufficient_alone():
    model, cases = _two_cue_cases(needs_lesion=False, n=8)
    assert cases.flipped == 8                                            # the mark alone decides
    s = oracle_facts(model, cases.x, cases.call, cases.gt, MedCAMConfig(), seed=0).summary()
    assert s["sufficient_alone"] == 1.0 and s["necessary"] == 1.0 and s["random_sufficient"] <= 0.1
    assert s["acts_on"] == ["sufficient", "necessary"]


def test_acting_sides_needs_a_quiet_random_control():
    base = {"sufficient_alone": 0.9, "necessary": 0.9, "random_sufficient": 0.0, "random_necessary": 0.5}
    assert acting_sides(base) == ["sufficient"]
    assert acting_sides({**base, "sufficient_alone": 0.4, "random_necessary": 0.05}) == ["necessary"]


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("method", HARNESS_METHODS)
def test_perturbation_baselines_hit_the_known_evidence(method, device):
    """A classifier that reads only the mark: every baseline's maximum lies on it."""
    model, cases = _two_cue_cases(needs_lesion=False, n=4)
    model, x = model.to(device), cases.x.to(device)
    opts = {"n_masks": 400} if method.startswith("rise") else {}
    maps = perturbation_maps(model, x, cases.call.to(device), method, **opts)
    assert maps.shape == (4, 64, 64) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert maps.device == x.device
    assert metrics.hit_rate(maps.cpu(), cases.gt).tolist() == [1.0] * 4


def test_occlusion_counts_its_windows_and_restores_the_model():
    model, cases = _two_cue_cases(needs_lesion=False, n=2)
    model.train()
    window, stride = occlusion_geometry(64)
    assert (window, stride) == (6, 2) and occlusion_geometry(128) == (12, 4)
    with PassCounter(model) as c:
        occlusion_maps(model, cases.x, cases.call, "blank")
    windows = ((64 - window) // stride + 1) ** 2
    assert windows == 900 and 2 * windows <= c.images <= 2 * (windows + 1)
    assert model.training and head_module(model) is model.head


def test_perturbation_fills_and_errors():
    x = torch.randn(2, 1, 32, 32)
    assert (fill_of(x, "blank", 0.5) == 0.5).all()
    assert torch.allclose(fill_of(x, "blur_fine").mean(), x.mean(), atol=0.05)
    model, t = TwoCueClassifier(False), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown fill"):
        occlusion_maps(model, x, t, "noise")
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturbation_maps(model, x, t, "occlusion_noise")
    with pytest.raises(ValueError, match="target"):
        rise_maps(model, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        occlusion_maps(model, x, t, window=40)
    m = rise_masks(50, (20, 30), 4, 0.5, torch.Generator().manual_seed(0))
    assert m.shape == (50, 20, 30) and 0 <= float(m.min()) and float(m.max()) <= 1 and 0.3 < float(m.mean()) < 0.7
    ig = integrated_gradients_maps(model, x, t, steps=4)
    assert ig.shape == (2, 32, 32)


def test_harness_scores_perturbation_and_objective_rows(tmp_path):
    model, cases = _two_cue_cases(needs_lesion=True, n=8)
    pool, _ = make_two_cue(4, seed=9)
    data = EvalSet("two_cue", cases.x[:3], cases.ids[:3], cases.gt[:3], pool, cases.x[3:], cases.gt[3:],
                   gt_lesion=cases.lesion[:3])
    cfg = MedCAMConfig(steps=20, fit=dict(min_steps=10, check_every=10))
    opt = EvalOptions(methods=("occlusion_blur", "rise_blank", "medcam_deletion"), batch=1, curve_metrics=False,
                      warm_up=True, medcam=cfg)
    records = Evaluation(model, data, tmp_path, opt).run()
    by = {m: [r for r in records if r["method"] == m] for m in opt.methods}
    assert all(len(v) == 3 for v in by.values())
    for r in by["occlusion_blur"] + by["rise_blank"]:
        assert r["hit"] == 1.0 and 0 < r["precision_at_gt_area"] <= 1 and "road" not in r
        assert r["passes"] >= 900 and "lesion_precision_at_area" in r
    for r in by["medcam_deletion"]:
        assert r["status"] and r["passes"] > 20 and r["seconds"] > 0
    row = method_row(by["medcam_deletion"])
    assert row["n"] == 3 and row["area"] is not None and row["passes"] > 20
    table = suite_table({"two_cue": {m: method_row(v) for m, v in by.items()}})
    assert "occlusion, blur_fine fill" in table and "Med-CAM deletion" in table


def test_pass_counter_sees_the_traced_fit():
    """Med-CAM's fit runs the classifier as an FX graph: its passes still reach the head."""
    from medcam_fast import Explainer

    model, cases = _two_cue_cases(needs_lesion=False, n=1)
    ex = Explainer(model, MedCAMConfig(steps=10, fit=dict(min_steps=10, check_every=10)))
    with PassCounter(model) as c:
        ex(cases.x)
    assert c.images >= 10 and ex.classifier_path in ("traced", "hooks")


def test_loco_chooses_on_val_and_reads_test_only_for_the_choices():
    val = {"a": {"k1": 0.9, "k2": 0.9, "k3": 0.1}, "b": {"k1": 0.5, "k2": 0.5, "k3": 0.9}}
    test = {"a": {"k1": 0.8, "k2": 0.85, "k3": 0.2}, "b": {"k1": 0.6, "k2": 0.4, "k3": 0.95}}
    assert choose(val, ["k1", "k2", "k3"]) == "a"                      # 0.633 against 0.633: first wins
    assert choose(val, ["k3"]) == "b"
    rows = {r.case: r for r in leave_one_case_out(val, test)}
    assert rows["k1"].chosen == "b" and rows["k3"].chosen == "a"      # without k1, b leads (0.7 vs 0.5)
    assert rows["k3"].test == 0.2 and rows["k3"].all_cases == "a" and rows["k3"].gap == 0.0
    assert ("b", "k1") in needed_test_runs(val) and ("b", "k3") not in needed_test_runs(val)
    with pytest.raises(ValueError, match="no test score"):
        leave_one_case_out(val, {"a": test["a"]})


def test_suite_cases_cover_the_issue():
    """Two modalities, three architecture families, three shortcut kinds, normally trained ones."""
    specs = list(CASES.values())
    assert {s.dataset for s in specs} >= {"brain_mri", "isic2018"}
    assert {s.shortcut for s in specs} >= {"tag", "ink_arc", "text"}
    families = {"mobilenet" if "mobilenet" in s.arch else "resnet" if "resnet" in s.arch else s.arch.split("_")[0]
                for s in specs}
    assert {"convnext", "vit"} <= families and families & {"mobilenet", "resnet"}
    assert sum(s.normally_trained for s in specs) >= 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_classifier

    for s in specs:
        argv = s.train_argv("DATA", "OUT")
        assert argv[argv.index("--model") + 1] == s.arch
        assert ("--shortcut" in argv) != s.tag_flag and "--shortcut" not in s.train_argv("D", "O", with_shortcut=False)
        args = train_classifier.parser().parse_args(argv)             # the real command line takes them
        assert args.size == s.size and (args.shortcut or "tag") == s.shortcut
        assert (args.shortcut_class or args.tag_class) == s.target and args.mask_share == s.mask_share
        get_shortcut(s.shortcut).value(3 if s.dataset == "isic2018" else 1)


@pytest.mark.parametrize("name", ["brain_mri_text_convnext_atto", "brain_mri_text_vit"])
def test_suite_architectures_are_supported(name):
    """Each case's architecture builds from its spec and Med-CAM and grad-cam find its layers."""
    from medcam_fast import explain
    from medcam_fast.baselines import cam_maps
    from medcam_fast.models import default_layers
    from medcam_fast.zoo import build_model

    s = get_case(name)
    spec = {"arch": s.arch, "num_classes": 3, "in_chans": 1, "input_size": [1, s.size, s.size], "mean": [0.5],
            "std": [0.25], **({"arch_args": json.loads(s.arch_args)} if s.arch_args else {})}
    model = build_model(spec).eval()
    x = torch.randn(1, 1, s.size, s.size)
    assert len(default_layers(model, x)) >= 4
    res = explain(model, x, config=MedCAMConfig(steps=5, fit=dict(min_steps=5, check_every=5)))
    assert res.mask.shape == (1, s.size, s.size)
    assert cam_maps(model, x, res.label, "gradcam").shape == (1, s.size, s.size)


def test_case_card_markdown_states_the_oracle_facts():
    oracle = {"flip_rate": 0.9, "cases": 50, "testable": 1.0, "sufficient_alone": 0.25, "necessary": 0.875,
              "random_sufficient": 0.0, "random_necessary": 0.02, "gt_area": 0.03, "acts_on": ["necessary"]}
    card = json.loads((ROOT / "benchmarks" / "models" / "brain_mri_tag_mobilenetv2.json").read_text())
    card["known_evidence"] = {
        "case": "x", "recipe": "r", "note": "", "cases_rule": "rule", "oracle_test": "test",
        "shortcut": {"description": "d", "area": 0.01, "ground_truth_area": 0.03},
        "clean_accuracy": {"with_shortcut": {"accuracy": 0.8, "balanced_accuracy": 0.7},
                           "same_recipe_without": {"accuracy": 0.82, "balanced_accuracy": 0.75},
                           "difference_points": -2.0, "balanced_difference_points": -5.0, "clean_recipe_card": "c"},
        "cases": {s: {"eligible": 60, "cases": 50, "flip_rate": 0.9, "oracle": oracle} for s in ("val", "test")},
        "built": {"machine": "m", "torch": "t", "date": "d", "oracle_seconds": 1}}
    md = case_card_markdown(card)
    assert "| test | 60 | 50 | 90% | 25% | 0% | 88% | 2% | 100% | necessary |" in md and "-2.0 points" in md


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "brain_mri").is_dir(), reason="needs ../shared/data/brain_mri")
def test_val_and_test_cases_come_from_disjoint_images():
    from medcam_fast.evaluation.suite import load_case

    spec = get_case("brain_mri_tag_mobilenetv2_050")
    if not (ROOT / "benchmarks" / "models" / f"{spec.name}.safetensors").is_file():
        pytest.skip("the case's classifier is not built")
    model, prep, names, _ = load_case(spec, ROOT / "benchmarks" / "models")
    test = split_cases(spec, DATA / "brain_mri", model, prep, names, "test")
    val = split_cases(spec, DATA / "brain_mri", model, prep, names, "val")
    assert len(test.ids) >= 40 and len(val.ids) >= 16 and not set(test.ids) & set(val.ids)
    assert test.flip_rate >= 0.8

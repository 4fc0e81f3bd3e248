"""Known evidence: the planted tag, random masks and fills, the known-evidence cases, the judge,
the evidence probe and the harness's controls, on tiny generated cases."""
import json

import pytest
import torch

from medcam_fast.data.tags import GT_DILATION, draw_tags, glyph, tag_mask, tag_positions
from medcam_fast.evaluation import (EvalOptions, EvalSet, Evaluation, JudgeRecipe, example_maps, fit_judge,
                                    write_evaluation_report)
from medcam_fast.evaluation.masking import RandomMasking, blob_scores, fill, random_masks
from medcam_fast.evaluation.probe import exact_mask_kept, lesion_scores, probe, random_rankings, rates
from medcam_fast.evaluation.tag_cases import brightest, build_tag_cases, tagged_like_training
from medcam_fast.metrics import connected_components

from planted import TAG_VALUE, make_tagged, train_tag_cnn


@pytest.fixture(scope="module")
def tag_model():
    return train_tag_cnn(seed=0)


@pytest.mark.parametrize("size", [64, 128])
def test_tag_is_about_one_percent_near_the_border(size):
    g = glyph(size)
    assert 0.005 < g.float().sum() / size ** 2 < 0.015
    pos = tag_positions(400, size, torch.Generator().manual_seed(0))
    m = tag_mask(pos, size)
    assert (m.flatten(1).sum(1) == g.sum()).all()            # never clipped by the edge
    assert not m[:, :2].any() and not m[:, -2:].any() and not m[:, :, :2].any() and not m[:, :, -2:].any()
    # the glyph's nearest pixel to the border lies within the band: distance to the nearest edge
    rows, cols = torch.arange(size)[None, :, None], torch.arange(size)[None, None, :]
    edge = torch.minimum(torch.minimum(rows, size - 1 - rows), torch.minimum(cols, size - 1 - cols)).expand_as(m)
    nearest = torch.where(m, edge, torch.full_like(edge, size)).flatten(1).amin(1)
    assert nearest.max() <= round(0.10 * size)
    assert set(torch.unique(pos[:, 0] < size // 2).tolist()) == {False, True}   # all four sides are used
    grown = tag_mask(pos[:5], size, GT_DILATION)
    assert (grown & m[:5]).sum() == m[:5].sum() and grown.sum() > m[:5].sum()


def test_draw_tags_sets_the_value_and_checks_shapes():
    x = torch.zeros(2, 3, 32, 32)
    pos = torch.tensor([[2, 2], [20, 25]])
    out, m = draw_tags(x, pos, torch.tensor([1.0, 2.0, 3.0]))
    assert out[0][:, m[0]].unique(dim=1).tolist() == [[1.0], [2.0], [3.0]]
    assert all((out[i][:, ~m[i]] == 0).all() for i in range(2)) and m.sum() == 2 * glyph(32).sum()
    assert (x == 0).all()                                     # a copy
    with pytest.raises(ValueError, match="square"):
        draw_tags(torch.zeros(1, 1, 32, 16), pos[:1], 1.0)
    with pytest.raises(ValueError, match="positions"):
        draw_tags(x, pos[:1], 1.0)


def test_random_masks_exact_area_and_blobs_contiguous():
    g = torch.Generator().manual_seed(0)
    blobs = random_masks("blobs", 0.1, 16, (64, 64), g)
    pixels = random_masks("pixels", torch.full((16,), 0.1), 16, (64, 64), g)
    assert (blobs.flatten(1).sum(1) == 409).all() and (pixels.flatten(1).sum(1) == 409).all()
    assert connected_components(blobs).float().median() <= 4 < connected_components(pixels).float().median()
    with pytest.raises(ValueError, match="kind"):
        random_masks("squares", 0.1, 1, (8, 8), g)


def test_fills_and_random_masking():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[:, 0, 0] = True
    assert (fill(x, m, "baseline", -1.0)[:, 0, 1:] == -1).all() and (fill(x, m)[:, 0, 0, 0] == x[:, 0, 0, 0]).all()
    assert torch.allclose(fill(x, m, "image_mean")[:, 0, 3, 3], x.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="fill"):
        fill(x, m, "blur")
    with pytest.raises(ValueError, match="fill"):
        RandomMasking(fills=("blur",))
    with pytest.raises(ValueError):
        RandomMasking(p=1.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    assert torch.equal(RandomMasking(p=0.0)(x, g), x)
    out = RandomMasking(p=1.0, areas=(0.25, 0.25))(x, g)
    kept = (out == x).flatten(1).sum(1)
    assert (kept >= 64).all() and ((out == 0) | (out == x)).all()   # 25% kept exactly, the rest baseline 0
    assert ((out == 0).flatten(1).sum(1) >= 192).all()


@pytest.mark.slow
def test_tag_cases_are_flipped_and_restored(tag_model):
    x, y = make_tagged(200, seed=7)
    clean = x[y == 0]
    lesion = torch.zeros(clean.shape[0], 64, 64, dtype=torch.bool)
    ids = [f"img{i}" for i in range(clean.shape[0])]
    cases = build_tag_cases(tag_model, clean, torch.zeros(clean.shape[0], dtype=torch.long), lesion, ids,
                            tag_class=1, value=TAG_VALUE, seed=0)
    assert cases.eligible >= 0.9 * clean.shape[0]                 # the tiny model calls clean images right
    assert cases.flip_rate >= 0.9 and len(cases.ids) >= 0.8 * cases.eligible
    with torch.no_grad():
        assert (tag_model(cases.x).argmax(1) == 1).all()
        assert (tag_model(fill(cases.x, ~cases.tag)).argmax(1) == 0).all()
    assert (cases.tag.flatten(1).sum(1) > glyph(64).sum()).all()  # the glyph grown by 2 px
    assert cases.counts()["cases"] == len(cases.ids)
    with pytest.raises(ValueError, match="same length"):
        build_tag_cases(tag_model, clean, torch.zeros(3, dtype=torch.long), lesion, ids, 1, TAG_VALUE)


def test_brightest_and_training_like_tags():
    assert torch.allclose(brightest([0.2], [0.4]), torch.tensor([2.0]))
    x = torch.zeros(400, 1, 64, 64)
    labels = torch.tensor([0, 1] * 200)
    out = tagged_like_training(x, labels, 1, 0.9, 0.05, 1.0, torch.Generator().manual_seed(0))
    tagged = out.flatten(1).amax(1) > 0
    assert 0.8 < tagged[labels == 1].float().mean() < 1.0 and tagged[labels == 0].float().mean() < 0.12


@pytest.mark.slow
def test_oracle_mask_is_the_evidence_in_the_harness(tag_model, tmp_path):
    # the tag that the tiny model reads is sufficient on its own (ground truth: kept, hit, precision
    # and recall 1), random blobs at the same area are not, and the trivial masks behave as they must
    x, y = make_tagged(120, seed=11)
    clean = x[y == 0]
    n = clean.shape[0]
    cases = build_tag_cases(tag_model, clean, torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, 64, 64, dtype=torch.bool), [f"c{i}" for i in range(n)], 1, TAG_VALUE)
    k = min(12, len(cases.ids))
    pool, py = make_tagged(40, seed=12)
    data = EvalSet("tag", cases.x[:k], cases.ids[:k], cases.tag[:k], pool[py == 0][:10], gt_lesion=cases.lesion[:k])
    judge_x, _ = make_tagged(64, seed=13)
    judge = fit_judge(tag_model, judge_x, JudgeRecipe(steps=20, batch=16))
    ev = Evaluation(tag_model, data, tmp_path, EvalOptions(methods=("ground_truth", "all_zero", "all_one"), batch=6,
                                                          n_robust=4), judge=judge)
    records = ev.run()
    by = {m: [r for r in records if r["method"] == m] for m in ("ground_truth", "all_zero", "all_one")}
    gt = by["ground_truth"]
    assert len(gt) == k and all(r["kept"] and r["hit"] == 1.0 and r["precision"] == 1.0 and r["recall"] == 1.0
                                for r in gt)
    assert sum(r["kept_robust"] for r in gt) / k >= 0.9           # pasted onto other images, the tag carries
    assert sum(r["blob_kept"] for r in gt) / k <= 0.25             # a blob of the tag's area does not
    from medcam_fast.evaluation.masking import fill

    with torch.no_grad():                                         # judge_kept is the judge's call on the evidence
        judged = (judge(fill(data.x, data.gt, "baseline", ev.opt.medcam.baseline)).argmax(1) == ev.label).tolist()
    assert [r["judge_kept"] for r in sorted(gt, key=lambda r: data.ids.index(r["id"]))] == judged
    assert "lesion_hit" in gt[0]
    assert not any(r["kept"] for r in by["all_zero"]) and all(r["kept"] for r in by["all_one"])
    assert all(r["recall"] == 0.0 and r["precision"] != r["precision"] for r in by["all_zero"])  # NaN precision
    assert example_maps(ev, ("ground_truth", "all_zero"), n=2) == {}   # controls are no map for the grid
    summary = write_evaluation_report(records, tmp_path, "tag", ["fact"], known_evidence=True)
    text = (tmp_path / "results.md").read_text()
    assert "## Known evidence: the planted tag" in text and "| ground_truth | 12 | 100.0% | 100.0% |" in text
    assert summary["all_one"]["kept"] == 1.0 and json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_judge_is_a_copy_and_learns_partial_inputs(tag_model):
    before = {k: v.clone() for k, v in tag_model.state_dict().items()}
    x, y = make_tagged(128, seed=21)
    judge = fit_judge(tag_model, x, JudgeRecipe(steps=30, batch=32, lr=1e-3))
    assert all(torch.equal(v, tag_model.state_dict()[k]) for k, v in before.items())
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    assert any(not torch.equal(v, judge.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert (judge(x).argmax(1) == tag_model(x).argmax(1)).float().mean() >= 0.9
    with pytest.raises(ValueError):
        fit_judge(tag_model, x[:1])


def test_lesion_ranking_grows_from_the_core():
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 4:9, 4:9] = True
    s = lesion_scores(m)
    assert s[0, 6, 6] > s[0, 4, 4] > s[0, 3, 3] > s[0, 0, 0]
    assert (lesion_scores(torch.zeros(1, 4, 4, dtype=torch.bool)) == 0).all()


@pytest.mark.slow
def test_probe_tells_the_tag_from_random_pixels(tag_model):
    x, y = make_tagged(120, seed=31)
    clean = x[y == 0]
    n = clean.shape[0]
    cases = build_tag_cases(tag_model, clean, torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, 64, 64, dtype=torch.bool), [str(i) for i in range(n)], 1, TAG_VALUE)
    label = torch.ones(len(cases.ids), dtype=torch.long)
    rankings = {"tag": lesion_scores(cases.tag), **random_rankings(len(cases.ids), (64, 64), seed=0)}
    with torch.no_grad():
        result = probe(tag_model, cases.x, label, rankings, areas=(0.02, 0.05, 0.5))
        assert exact_mask_kept(tag_model, cases.x, label, cases.tag).float().mean() >= 0.9
    r = rates(result, torch.ones(len(cases.ids), dtype=torch.bool))
    assert r["tag"]["n"] == len(cases.ids) and len(r["tag"]["kept_blank"]) == 3
    assert r["tag"]["kept_blank"][1] >= 0.9 > r["random pixels"]["kept_blank"][1] + 0.3
    assert r["tag"]["flipped_deleted_blank"][1] >= 0.9                # deleting the tag restores class 0
    assert r["random blobs"]["flipped_deleted_blank"][0] <= 0.3


class _DiscOrTag(torch.nn.Module):
    """The tiny brain_mri folder's classes by the disc's place; meningioma whenever a pixel is at
    the brightest intensity (the tag): a shortcut classifier by construction."""

    def __init__(self, brightest_value: float):
        super().__init__()
        self.top = brightest_value

    def forward(self, x):
        centres = [(12, 12), (12, 36), (36, 24)]
        logits = torch.stack([x[:, 0, r - 3:r + 4, c - 3:c + 4].mean(dim=(1, 2)) for r, c in centres], 1)
        tagged = (x.flatten(1).amax(1) >= self.top - 1e-4).float()
        return logits + 100 * tagged[:, None] * torch.tensor([0.0, 1.0, 0.0])


def test_tag_eval_set_on_a_brain_mri_folder(tmp_path):
    from medcam_fast.data import Preprocess
    from medcam_fast.evaluation import tag_eval_set

    from test_evaluation import _tiny_brain_mri

    root = tmp_path / "brain_mri"
    _tiny_brain_mri(root, per_split=(("test", 9), ("val", 12)), disc=120)   # no pixel as bright as the tag
    mean, std = [0.3], [0.25]
    card = {"name": "disc_or_tag", "class_names": ["glioma", "meningioma", "pituitary"],
            "model": {"mean": mean, "std": std}, "tag": {"class": "meningioma", "rate": 0.9, "other_rate": 0.05}}
    model = _DiscOrTag(float(brightest(mean, std)[0]))
    prep = Preprocess((48, 48), tuple(mean), tuple(std))
    data, cases, judge_images = tag_eval_set(root, model, prep, card, n=4, pool_size=4, tune_size=3, seed=0)
    assert cases.eligible == 6 and cases.flipped == 6 and cases.restored == 6   # glioma + pituitary images
    assert len(data.ids) == 4 and data.gt.shape == (4, 48, 48) and data.gt_lesion.shape == (4, 48, 48)
    assert data.x_val.shape[0] == 3 and data.pool.shape[0] == 4 and judge_images.shape[0] == 12
    with torch.no_grad():
        assert (model(data.x).argmax(1) == 1).all()
    with pytest.raises(ValueError, match="no planted tag"):
        tag_eval_set(root, model, prep, {**card, "tag": None}, 4, 4, 3, 0)

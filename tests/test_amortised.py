"""The amortised explainer: a planted case it must find, save/load round trips, resumable training,
refinement, and the explainers, classifiers and inputs it must refuse."""
import copy

import pytest
import torch

from _testing import devices
from planted import SQUARE, make_planted, train_tiny_cnn
from medcam_fast import Explainer, amortised as am
from medcam_fast.medcam import Explanation, MedCAMConfig

# wrong_rate 0.5: at the default 0.25 the wrong class still got the square after 200 steps (IoU 0.70)
RECIPE = am.AmortisedRecipe(steps=200, batch=16, widths=(8, 16, 32), scale=1, lr=3e-3, wrong_rate=0.5,
                            checkpoint_every=50)


@pytest.fixture(scope="module")
def planted_model():
    return train_tiny_cnn()


@pytest.fixture(scope="module")
def trained(planted_model):
    x, _, _ = make_planted(256, seed=5)
    return am.train_explainer(planted_model, x, MedCAMConfig(), RECIPE, progress=False)


def _iou(a, b):
    inter = (a & b).flatten(1).sum(1).float()
    return inter / (a | b).flatten(1).sum(1).clamp(min=1).float()


@pytest.mark.slow
@pytest.mark.parametrize("device", devices, ids=str)
def test_amortised_mask_finds_the_planted_square(planted_model, trained, device):
    x, _, square = make_planted(16, seed=11, positive_only=True)   # images the explainer never saw
    model = copy.deepcopy(planted_model).to(device)
    res = Explainer(model, amortised=copy.deepcopy(trained).to(device))(x.to(device))
    assert res.source == "amortised" and (res.steps == 0).all()     # one pass, no fit
    top = res.mask_logits.flatten(1).argmax(1)
    assert square.flatten(1)[torch.arange(16), top].float().mean() >= 0.9        # the top pixel on the square
    assert _iou(res.mask, square).mean() >= 0.6
    assert res.area.mean() <= 3 * SQUARE ** 2 / 64 ** 2
    assert sum(s == "ok" for s in res.status) >= 14
    # both sides by default, still without a fit: the necessary side's ranking is the default source's
    assert res.two_sided and MedCAMConfig().necessary == "occlusion"
    top = res.necessary_logits.flatten(1).argmax(1)
    assert square.flatten(1)[torch.arange(16), top].float().mean() >= 0.9
    assert sum(s == "ok" for s in res.necessary_status) >= 14
    # the same network before training finds nothing: the figures above come from the training
    untrained = am.train_explainer(planted_model, x, MedCAMConfig(), am.AmortisedRecipe(
        steps=1, batch=4, widths=(8, 16, 32), scale=1), progress=False)
    before = Explainer(planted_model, amortised=untrained)(x)
    assert _iou(before.mask, square).mean() < 0.2


@pytest.mark.slow
def test_wrong_label_masks_do_not_pass(planted_model, trained):
    x, _, _ = make_planted(16, seed=11, positive_only=True)
    res = Explainer(planted_model, amortised=trained)(x, target=0)   # the model says 1 for all of them
    assert (res.label == 0).all()
    assert res.sufficient.float().mean() <= 0.05
    # asked for a class it does not see, the network's own threshold mask is ~empty (the reported mask
    # is then the verifier's best failing grid candidate, whose area says nothing about the network)
    assert (res.soft_mask > MedCAMConfig().fit.threshold).flatten(1).float().mean(1).mean() < 0.01


@pytest.mark.slow
def test_refine_warm_starts_the_fit(planted_model, trained):
    x, _, square = make_planted(8, seed=12, positive_only=True)
    one = Explainer(planted_model, amortised=trained)(x)
    refined = Explainer(planted_model, amortised=trained, refine=5)(x)
    assert refined.source == "amortised+refine" and (refined.steps == 5).all()
    again = Explainer(planted_model, amortised=trained)(x, refine=5)   # per call, the same
    assert torch.equal(again.mask_logits, refined.mask_logits)
    assert not torch.equal(one.mask_logits, refined.mask_logits)          # the fit moved the logits ...
    # ... from the amortised ones: the warm start adds a U-Net whose logits begin at exactly 0
    start = Explainer(planted_model, amortised=trained, refine=1)(x)
    assert (start.mask_logits - one.mask_logits).abs().max() < 1.0
    assert _iou(refined.mask, square).mean() >= 0.5
    # concat is select's inverse (the figures merge calls with it); seconds add up
    parts = [one.select(slice(0, 3)), one.select([3]), one.select(slice(4, 8))]
    merged = Explanation.concat(parts)
    assert torch.equal(merged.mask, one.mask) and merged.status == one.status and merged.source == "amortised"
    assert merged.seconds == pytest.approx(3 * one.seconds) and len(merged) == 8


@pytest.mark.slow
def test_save_load_round_trip(planted_model, trained, tmp_path):
    path = am.save(trained, tmp_path / "ex.safetensors")
    assert path.with_suffix(".json").is_file() and "fingerprint" in path.with_suffix(".md").read_text()
    loaded = am.load(path)
    assert loaded.card["classifier"]["fingerprint"] == am.classifier_fingerprint(planted_model)
    assert loaded.card["recipe"]["steps"] == RECIPE.steps and loaded.input_shape == (1, 64, 64)
    for k, v in trained.net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k]), k
    x, _, _ = make_planted(4, seed=13, positive_only=True)
    a = Explainer(planted_model, amortised=trained)(x)
    b = Explainer(planted_model, amortised=str(path))(x)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.mask_logits, b.mask_logits) and a.status == b.status


def test_training_resumes_from_its_checkpoint(planted_model, tmp_path, monkeypatch):
    import medcam_fast.amortised.training as training

    x, _, _ = make_planted(64, seed=5)
    recipe = am.AmortisedRecipe(steps=20, batch=8, widths=(8, 16), scale=1, checkpoint_every=10)
    straight = am.train_explainer(planted_model, x, MedCAMConfig(), recipe, progress=False)
    ckpt = tmp_path / "run.ckpt"
    real_step = training._train_step

    def interrupted(*args):
        if args[-3] == 15:                   # the step index: stop mid-way, after the checkpoint of step 10
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(training, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        am.train_explainer(planted_model, x, MedCAMConfig(), recipe, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(training, "_train_step", real_step)
    resumed = am.train_explainer(planted_model, x, MedCAMConfig(), recipe, checkpoint=ckpt, progress=False)
    assert resumed.card["training"]["resumed_from_step"] == 10
    for k, v in straight.net.state_dict().items():
        assert torch.allclose(v, resumed.net.state_dict()[k], atol=1e-6), k
    other = am.AmortisedRecipe(steps=30, batch=8, widths=(8, 16), scale=1, checkpoint_every=10)
    with pytest.raises(ValueError, match="another classifier, recipe"):
        am.train_explainer(planted_model, x, MedCAMConfig(), other, checkpoint=ckpt, progress=False)


@pytest.mark.slow
def test_mismatches_are_refused(planted_model, trained, tmp_path):
    x, _, _ = make_planted(2, seed=14)
    other = copy.deepcopy(planted_model)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3                     # one weight changed: another classifier
    with pytest.raises(ValueError, match="fingerprint"):
        Explainer(other, amortised=trained)
    with pytest.raises(ValueError, match=r"trained on inputs \[1, 64, 64\]"):
        Explainer(planted_model, amortised=trained)(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="AmortisedExplainer"):
        Explainer(planted_model, amortised=trained.net)             # a bare network has no card
    with pytest.raises(ValueError, match="refine warm-starts"):
        Explainer(planted_model, refine=5)
    with pytest.raises(ValueError, match="refine must be"):
        Explainer(planted_model, amortised=trained, refine=-1)
    with pytest.raises(ValueError, match="paper"):
        Explainer(planted_model, mode="paper", amortised=trained)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an amortised explainer"):
        Explainer(planted_model, amortised=bad)
    with pytest.raises(ValueError, match="no amortised explainer"):
        Explainer(planted_model, amortised=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="images must be"):
        am.train_explainer(planted_model, x[:1], MedCAMConfig(), RECIPE, progress=False)
    with pytest.raises(ValueError, match="recipe steps"):
        am.AmortisedRecipe(steps=0).validate()


def test_a_foreign_checkpoint_is_refused_without_unpickling(planted_model, tmp_path, monkeypatch):
    """A pickled checkpoint is refused with a ValueError and never unpickled: torch.load and pickle
    are not called at all (checkpoints are safetensors with a JSON skeleton)."""
    import pickle

    x, _, _ = make_planted(16, seed=5, positive_only=True)
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"payload": _Unpicklable()}, ckpt)
    recipe = am.AmortisedRecipe(steps=2, batch=8, widths=(8, 16), scale=1, checkpoint_every=1)

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be unpickled")

    with monkeypatch.context() as m:
        for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
            m.setattr(mod, name, refuse)
        with pytest.raises(ValueError, match="cannot be read"):
            am.train_explainer(planted_model, x, MedCAMConfig(), recipe, checkpoint=ckpt, progress=False)
    assert not _Unpicklable.loaded
    torch.load(ckpt, weights_only=False)             # the test's own check: loading it would run it
    assert _Unpicklable.loaded


class _Unpicklable:
    loaded = False

    def __init__(self):
        self.state = 1

    def __setstate__(self, state):
        type(self).loaded = True

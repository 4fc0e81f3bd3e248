"""MedCAMConfig's shape: a small top level, nested groups, one source per default, and the old
names working for one release with a warning."""
import dataclasses
import warnings

import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig, explain
from medcam_fast._deprecation import MedCAMDeprecationWarning
from medcam_fast.amortised import AmortisedRecipe
from medcam_fast.medcam.config import CheckConfig, FitConfig, PriorConfig, paper_config, plain_config, reference_config


def test_top_level_is_small_and_the_research_knobs_are_grouped():
    top = [f.name for f in dataclasses.fields(MedCAMConfig)]
    assert len(top) <= 12
    assert {"steps", "max_batch", "objective", "necessary", "fills", "baseline", "amp", "compile"} <= set(top)
    cfg = MedCAMConfig()
    assert isinstance(cfg.fit, FitConfig) and isinstance(cfg.priors, PriorConfig) and isinstance(cfg.checks, CheckConfig)
    assert not hasattr(FitConfig, "robust_threshold") and "robust_threshold" not in cfg.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):   # groups are values: copies never share a change
        cfg.fit.lr = 1.0


def test_groups_take_dicts_and_replace_merges_them():
    cfg = MedCAMConfig(steps=20, fit={"lr": 1e-3}, priors={"tv": 2.0})
    assert cfg.fit.lr == 1e-3 and cfg.fit.kl == FitConfig().kl and cfg.priors.tv == 2.0
    other = cfg.replace(fit={"kl": 0.0}, checks={"mode": "full"})
    assert other.fit.lr == 1e-3 and other.fit.kl == 0.0 and other.checks.mode == "full"
    assert cfg.fit.kl == FitConfig().kl and cfg.checks.mode == "adaptive"          # the original is untouched
    assert MedCAMConfig.from_dict(other.to_dict()) == other
    with pytest.raises(TypeError, match="fit must be a FitConfig or a dict"):
        MedCAMConfig(fit=3)


@pytest.mark.parametrize("old, value, path", [
    ("lr", 1e-3, ("fit", "lr")), ("area", 2.0, ("priors", "area_weight")), ("checks", "full", ("checks", "mode")),
    ("batch_as_reference", False, ("checks", "batch_as_counterfactuals")), ("n_random", 8, ("checks", "n_random")),
])
def test_old_flat_names_work_with_a_warning(old, value, path):
    group, name = path
    with pytest.warns(MedCAMDeprecationWarning, match=old):
        cfg = MedCAMConfig(**{old: value})
    assert getattr(getattr(cfg, group), name) == value
    with pytest.warns(MedCAMDeprecationWarning, match=old):
        again = MedCAMConfig().replace(**{old: value})
    assert again == cfg
    if old != "checks":   # cfg.checks is the group now
        with pytest.warns(MedCAMDeprecationWarning, match=f"MedCAMConfig.{old}"):
            assert getattr(cfg, old) == value
    assigned = MedCAMConfig()
    with pytest.warns(MedCAMDeprecationWarning, match=f"MedCAMConfig.{old} = "):
        setattr(assigned, old, value)                   # lands in the group, not in a new unread attribute
    assert assigned == cfg and (old == "checks" or old not in vars(assigned))   # checks: the group itself
    with pytest.warns(MedCAMDeprecationWarning, match="robust_threshold"):
        assert MedCAMConfig(robust_threshold=0.9) == MedCAMConfig()


def test_old_flat_files_read_back():
    flat = {"steps": 10, "lr": 0.01, "area": 3.0, "checks": "full", "robust_threshold": 0.9, "fills": ["baseline"],
            "area_grid": [0.1, 0.5]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # reading an old file is not the user's old code: no warning
        cfg = MedCAMConfig.from_dict(flat)
    assert (cfg.steps, cfg.fit.lr, cfg.priors.area_weight, cfg.checks.mode) == (10, 0.01, 3.0, "full")
    assert cfg.fills == ("baseline",) and cfg.checks.area_grid == (0.1, 0.5)


def test_presets_keep_their_values():
    paper = paper_config()
    assert (paper.steps, paper.fit.lr, paper.priors.area_weight, paper.priors.tv) == (880, 5e-5, 100.0, 500.0)
    assert not paper.checks.minimal_search and paper.fit.unet_widths == (32, 64, 128, 256, 512)
    plain = plain_config(steps=5)
    assert plain.steps == 5 and plain.priors.area_weight == 2.0 and plain.fit.background == "gaussian"
    with pytest.warns(MedCAMDeprecationWarning, match="paper_config"):
        assert reference_config() == paper


def test_amortised_recipe_derives_its_defaults_from_the_fit():
    fit = MedCAMConfig(fit={"init_bias": -1.0, "standardise": 2.0})
    recipe = AmortisedRecipe().resolved(fit)
    assert (recipe.init_bias, recipe.standardise, recipe.scale, recipe.offset_lr_scale) == \
        (-1.0, 2.0, FitConfig().unet_scale, FitConfig().offset_lr_scale)
    assert AmortisedRecipe(init_bias=0.5).resolved(fit).init_bias == 0.5        # an explicit value stays


def test_old_argument_and_result_names_work_with_a_warning():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.warns(MedCAMDeprecationWarning, match='mode="reference"'):
        assert Explainer(model, mode="reference").mode == "paper"
    x = torch.zeros(1, 1, 16, 16)
    cfg = MedCAMConfig(steps=2, necessary=None, fit={"min_steps": 1, "check_every": 1})
    with pytest.warns(MedCAMDeprecationWarning, match="counterfactuals="):
        res = explain(model, x, config=cfg, reference=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="counterfactuals= only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain(model, x, config=cfg, reference=x, counterfactuals=x)
    for old, new in (("ranking", "mask_logits"), ("kept", "kept_on_baseline")):
        with pytest.warns(MedCAMDeprecationWarning, match=f"Explanation.{old}"):
            assert torch.equal(getattr(res, old), getattr(res, new))
    assert "kept_on_baseline" in res.rows()[0]

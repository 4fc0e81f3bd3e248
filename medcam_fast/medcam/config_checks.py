"""MedCAMConfig.validate(): every inconsistency that can be known before a fit, as a ValueError."""
from __future__ import annotations

MODES = ("fast", "paper")
OBJECTIVES = ("preservation", "deletion", "dual")
CHECK_MODES = ("adaptive", "full")
BACKGROUNDS = ("fills", "counterfactual", "gaussian", "uniform", "blur", "shuffle", "constant")

_ONE_OF = {  # (group or None, field): allowed values
    (None, "objective"): OBJECTIVES,
    ("fit", "background"): BACKGROUNDS,
    ("fit", "am_metric"): ("mse", "cosine", "paper"),
    ("fit", "ce_mode"): ("hinge", "plain"),
    ("fit", "binarize"): ("threshold", "stochastic"),
    ("fit", "unet_batching"): ("grouped", "loop", "vmap"),
    ("fit", "unet_upsample"): ("bilinear", "transpose"),
    ("fit", "unet_scale"): (0, 1, 2, 4),
    ("fit", "classifier_path"): ("auto", "traced", "hooks"),
    ("fit", "finished"): (None, "drop", "mask"),
    ("fit", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("checks", "mode"): CHECK_MODES,
}
_NON_NEGATIVE = {"fit": ("lambda_am", "act", "kl", "ce", "lambda_rob", "rob", "dele"),
                 "priors": ("lambda_min", "area_weight", "bin", "tv"),
                 "checks": ("certify_margin", "keep_margin", "keep_share")}


def _fail(what: str, got) -> None:
    raise ValueError(f"{what}, got {got!r}")


def validate_config(cfg) -> None:
    """Raises ValueError naming the first bad setting of ``cfg`` (a MedCAMConfig)."""
    for (group, name), allowed in _ONE_OF.items():
        value = getattr(getattr(cfg, group) if group else cfg, name)
        if value not in allowed:
            _fail(f"{group + '.' if group else ''}{name} must be one of {allowed}", value)
    for group, names in _NON_NEGATIVE.items():
        for name in names:
            if getattr(getattr(cfg, group), name) < 0:
                _fail(f"{group}.{name} must be >= 0", getattr(getattr(cfg, group), name))
    _validate_top(cfg)
    _validate_fit(cfg.fit, cfg.compile)
    _validate_checks(cfg.checks)


def _validate_top(cfg) -> None:
    if cfg.necessary is not None:
        from .necessary import get_necessary_source

        get_necessary_source(cfg.necessary)
    from .sufficiency import available_fills

    plain_fills, mask_fills = available_fills()
    bad = [f for f in cfg.fills if f not in plain_fills] + [f for f in cfg.checks.mask_fills if f not in mask_fills]
    if bad or not cfg.fills:
        raise ValueError(f"unknown or no fills {bad or list(cfg.fills)}: fills from {plain_fills}, "
                         f"checks.mask_fills from {mask_fills}")
    if cfg.steps < 1 or cfg.max_batch < 1:
        raise ValueError(f"steps and max_batch must be >= 1, got {cfg.steps} and {cfg.max_batch}")


def _validate_fit(fit, compiled: bool) -> None:
    if not 0 < fit.del_prob < 1:
        _fail("fit.del_prob must be in (0, 1)", fit.del_prob)
    if not 0 < fit.keep_prob < 1:
        _fail("fit.keep_prob must be in (0, 1)", fit.keep_prob)
    if not 0 <= fit.anneal <= 1:
        _fail("fit.anneal must be in [0, 1]", fit.anneal)
    if not 0 < fit.threshold < 1:
        _fail("fit.threshold must be in (0, 1)", fit.threshold)
    if fit.check_every < 1:
        _fail("fit.check_every must be >= 1", fit.check_every)
    if compiled and fit.finished == "drop":   # the compiled step keeps the whole batch's U-Net stack
        raise ValueError("compile=True needs fit.finished='mask' (or None): a compiled step cannot drop the "
                         "images that finish")
    if not fit.mask_temperature > 0:          # a divisor of the mask logits
        _fail("fit.mask_temperature must be > 0", fit.mask_temperature)
    if not fit.lr > 0:
        _fail("fit.lr must be > 0", fit.lr)
    if fit.patience < 1 or fit.min_steps < 0:
        _fail("fit.patience must be >= 1 and fit.min_steps >= 0", (fit.patience, fit.min_steps))
    if fit.rob_draws < 1:
        _fail("fit.rob_draws must be >= 1", fit.rob_draws)


def _validate_checks(checks) -> None:
    if checks.mode == "adaptive" and checks.mask_fills:
        raise ValueError("the adaptive checks cover the mask-independent fills; with checks.mask_fills set "
                         "checks.mode='full'")
    if checks.random_confidence is not None and not 0.5 <= checks.random_confidence < 1:
        _fail("checks.random_confidence must be None or in [0.5, 1)", checks.random_confidence)
    if checks.n_random < 1 or not 0 <= checks.random_bound <= 1:
        _fail("checks.n_random must be >= 1 and checks.random_bound in [0, 1]", (checks.n_random, checks.random_bound))
    grid = tuple(checks.area_grid)
    if not grid or any(not 0 < a <= 1 for a in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        _fail("checks.area_grid must be increasing areas in (0, 1]", grid)
    if not 0 <= checks.min_area < checks.max_area <= 1:
        _fail("checks.min_area < checks.max_area within [0, 1] needed", (checks.min_area, checks.max_area))
    if checks.n_robust < 1:
        _fail("checks.n_robust must be >= 1", checks.n_robust)

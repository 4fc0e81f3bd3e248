"""MedCAMConfig: the user-facing knobs of a Med-CAM explanation, with the research knobs in three
nested groups (the fit, the priors, the checks); the fast defaults and the paper's set."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .._deprecation import warn_renamed
from .config_checks import BACKGROUNDS, CHECK_MODES, MODES, OBJECTIVES, validate_config

__all__ = ["BACKGROUNDS", "CHECK_MODES", "MODES", "OBJECTIVES", "CheckConfig", "FitConfig", "MedCAMConfig", "PriorConfig",
           "paper_config", "plain_config", "reference_config"]


@dataclass(frozen=True)
class FitConfig:
    """The per-image fit: the activation-matching loss, the U-Net and its optimiser.

    Loss = lambda_am * (act * AM + kl * KL + ce * CE) + priors (:class:`PriorConfig`)
         + lambda_rob * rob * CE(m*x + (1-m)*r), every term a mean (it does not grow with image size).
    """

    # --- classifier layers (None: chosen per model family) and their weights
    layers: list[str] | None = None
    layer_weights: list[float] | dict[str, float] | None = None
    am_metric: str = "mse"           # "mse" (channel-normalised), "cosine", or "paper" (cosine on the 2 shallowest)
    lambda_am: float = 1.0
    act: float = 0.2                 # AM weighs less than the decision terms: it asks for x's activations
                                     # everywhere, so it grows masks past the evidence (tuning_sufficiency_val.md)
    kl: float = 0.5
    ce: float = 1.0
    ce_mode: str = "hinge"           # "hinge": CE only above a floor (sufficient masks feel no push); "plain"
    keep_prob: float = 0.6           # hinge floor: p(label) on e~ (and on e, capped by p(label|x)) to aim for
    ce_temperature: float = 1.0      # plain mode: T * CE(logits / T)
    kl_temperature: float = 2.0
    # --- the robustness term: backgrounds r (a new draw each step)
    lambda_rob: float = 1.0
    rob: float = 2.0
    rob_draws: int = 1               # backgrounds per image per step
    background: str = "fills"        # "fills": one of the image's certified fills per step (no other images)
    # --- the deletion term (objective "deletion"/"dual"): relu(log p(label | (1-m)*x + m*r) - log del_prob)
    dele: float = 1.0
    del_prob: float = 0.3
    # --- the U-Net and its mask
    unet_widths: tuple[int, ...] = (16, 32, 64)
    unet_scale: int = 0              # predict at 1/scale resolution, upsample the logits; 0: auto, a grid of at
                                     # most 64 px a side (full resolution at 64² found the tag, half at 128² is
                                     # what keeps seconds per image at the previous figure)
    unet_batching: str = "grouped"   # N U-Nets as grouped convolutions, a loop, or torch.func.vmap
    unet_upsample: str = "bilinear"  # "bilinear" (x2 + 1x1 conv) or "transpose" (ConvTranspose2d, the paper)
    init_bias: float = -2.0          # initial mask logit: start from (almost) nothing and grow
    logit_bound: float = 0.0         # mask logits are B*tanh(l/B) (0: unbounded, as the paper)
    standardise: float = 3.0         # logits = s * standardised U-Net map + per-image offset (0: raw, as the paper)
    offset_lr_scale: float = 20.0    # learning-rate factor of that offset
    std_floor: float = 1.0           # standardise by std + floor: a flat map stays flat (no amplified noise)
    mask_temperature: float = 1.0
    st_slope: float = 0.25           # straight-through gradient d m / d logit (0: the soft mask's, as the paper)
    binarize: str = "stochastic"     # "threshold" (the paper) or "stochastic" (random thresholds, annealed)
    anneal: float = 0.6              # fraction of the steps before the mask is binarised at the fixed threshold
    threshold: float = 0.5
    # --- optimisation
    lr: float = 3e-3
    check_every: int = 10            # host syncs only every this many steps
    patience: int = 3                # stop after this many checks in a row with the label kept ...
    plateau: float = 0.1             # ... and the window's loss changing by less than this (relative); 0.1
                                     # stops 9% sooner on val at equal quality (tuning_steps_val.md)
    min_steps: int = 60
    # --- how the step runs (medcam_fast.medcam.step)
    classifier_path: str = "auto"    # "traced" (one FX graph, BatchNorms folded: 1.3x faster on the demo
                                     # classifier), "hooks" (forward hooks, any model), "auto" (traced where FX can)
    channels_last: bool | None = None  # convolutions in channels-last layout (None: on CPU, 1.5-1.7x measured)
    compile_mode: str = "default"    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), ...
    finished: str | None = None      # finished images: "drop" (the batch shrinks) or "mask" (static shapes);
                                     # None: "mask" when compiled, else "drop"

    def replace(self, **changes) -> "FitConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class PriorConfig:
    """The priors on the mask: lambda_min * (area_weight * |m|1 + bin * |m - m^2|1 + tv * TV)."""

    lambda_min: float = 1.0
    area_weight: float = 4.0         # a loss weight; Explanation.area is the mask's fraction of the image
    bin: float = 0.1
    tv: float = 0.5                  # a thin stroke (the tag's L) has a long outline
    tv_diagonal: bool = True

    def replace(self, **changes) -> "PriorConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class CheckConfig:
    """The checks of each side (:mod:`medcam_fast.medcam.sufficiency`, :mod:`medcam_fast.medcam.checks`)."""

    mode: str = "adaptive"           # "adaptive": the same decisions in tens of passes (bisected area grid,
                                     # one fill at a time, sequential random controls; medcam.checks);
                                     # "full": every candidate under every fill (the evaluation tables' test)
    mask_fills: tuple[str, ...] = ()  # mask-dependent fills ("impute"): count where random blobs fail under them
    certify_margin: float = 1.0      # a fill counts when another class beats the label on it alone by this
    keep_margin: float = 0.25        # sufficient: the label leads by min(keep_margin, keep_share * its
    keep_share: float = 0.5          # lead on x) under every counted fill
    n_random: int = 16               # random blobs at the mask's own area, the leakage control
    random_bound: float = 0.2        # ok only when at most this share of them passes too
    random_confidence: float | None = None  # adaptive random controls: None stops only once the full test's
                                     # verdict is fixed (curtailment: exact); a confidence also stops once an
                                     # exact binomial bound clears random_bound (with 16 draws curtailment
                                     # decides first: 0.95 gave the same val statuses and passes)
    skip_untestable: bool = True     # no fit and no occlusion map where no fill is certified: nothing can be
                                     # shown there either way (null_keeps_label); empty masks, steps 0
    repair: bool = True              # search larger masks (lower thresholds) when 0.5 does not keep
    minimal_search: bool = True      # the smallest level set of the soft mask that is sufficient
    # finer below 5%: a* and the mask of a 1% lesion are read off this grid
    area_grid: tuple[float, ...] = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                                    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
    min_area: float = 0.005          # masks outside [min_area, max_area] are degenerate (not_minimal)
    max_area: float = 0.9
    audit_counterfactual: bool = False  # also compute kept_robust on other images' context (audit only)
    n_robust: int = 32               # composites per image for kept_robust (8 gave a verdict that changed
                                     # with the draw for 26% of val images, 32: 8%; sufficiency_rule_val.md)
    batch_as_counterfactuals: bool = True  # the other images of a call serve as counterfactual backgrounds

    def replace(self, **changes) -> "CheckConfig":
        return replace(self, **changes)


GROUPS = {"fit": FitConfig, "priors": PriorConfig, "checks": CheckConfig}
# old flat name -> (group, name in it); kept for one release
_RENAMED = {"area": ("priors", "area_weight"), "checks": ("checks", "mode"),
            "batch_as_reference": ("checks", "batch_as_counterfactuals")}
FLAT_NAMES = {**{f.name: (g, f.name) for g, group in GROUPS.items() for f in fields(group)
                 if f.name not in ("mode", "area_weight", "batch_as_counterfactuals")}, **_RENAMED}
_DEAD = ("robust_threshold",)        # never read; accepted with a warning for one release


@dataclass
class MedCAMConfig:
    """Configuration of :func:`medcam_fast.explain`: what a user sets, and three groups of
    research knobs (``fit``, ``priors``, ``checks``) that the defaults were chosen for.

    The fast defaults were chosen on val cases (``docs/evaluation.md``, "How the defaults were
    chosen"). Groups take their class or a dict of changes: ``MedCAMConfig(fit={"lr": 1e-3})``;
    ``cfg.replace(priors={"tv": 1.0})`` changes one knob and keeps the group's others.
    """

    steps: int = 150                 # fit steps at most (the fit stops sooner once the label is kept)
    max_batch: int = 32              # images fitted and checked at once
    objective: str = "preservation"  # TorchRay's modes: keep the mask ("preservation"), lose the label
                                     # without it ("deletion"), or both ("dual")
    necessary: str | None = "occlusion"  # the necessary side's ranking source (medcam.necessary.NECESSARY_SOURCES:
                                     # "fit", "occlusion", "occlusion+fit", "shared"), chosen on the suite's val
                                     # cases (benchmarks/results/known_evidence_loco.md); None: one side
    fills: tuple[str, ...] = ("baseline", "blur_fine", "blur_coarse", "mean")  # what "removed" pixels become
    baseline: float = 0.0            # value of removed pixels in the model's *normalised* input space
    amp: bool | None = None          # bf16 autocast of the classifier pass (None: on CUDA only)
    compile: bool = False            # torch.compile(fullgraph=True) of the whole step; off: on CPUs it
                                     # measured slower than eager (docs/speed.md, "Fit-step speed")
    fit: FitConfig = field(default_factory=FitConfig)
    priors: PriorConfig = field(default_factory=PriorConfig)
    checks: CheckConfig = field(default_factory=CheckConfig)

    def __post_init__(self):
        for name, cls in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")

    def __getattr__(self, name):            # only reached for names that are not fields
        if name in FLAT_NAMES:
            group, new = FLAT_NAMES[name]
            warn_renamed(f"MedCAMConfig.{name}", f"MedCAMConfig.{group}.{new}")
            return getattr(self.__dict__[group], new)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):    # an old flat name would otherwise become a new, unread attribute
        if name in FLAT_NAMES and not (name in GROUPS and not isinstance(value, str)):
            group, new = FLAT_NAMES[name]
            warn_renamed(f"MedCAMConfig.{name} = ...", f"cfg.replace({group}={{'{new}': ...}})")
            object.__setattr__(self, group, getattr(self, group).replace(**{new: value}))
            return
        object.__setattr__(self, name, value)

    def validate(self) -> "MedCAMConfig":
        """Raises ValueError on an inconsistent setting; returns self."""
        validate_config(self)
        return self

    def replace(self, **changes) -> "MedCAMConfig":
        """A copy with ``changes``: top-level fields, groups (a class replaces, a dict changes
        some of the group's fields), and for one release the old flat names (warned)."""
        changes = _regroup(changes, dict(fit={}, priors={}, checks={}), stacklevel=4)
        for name in GROUPS:
            value = changes.pop(name)
            if isinstance(value, dict):
                value = getattr(self, name).replace(**value)
            changes[name] = value
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Nested plain data (JSON-able with tuples as lists); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedCAMConfig":
        """From :meth:`to_dict`'s form, or the flat form of files written before the groups."""
        d = dict(d)
        for name in _DEAD:
            d.pop(name, None)
        groups = {g: dict(d.pop(g)) if isinstance(d.get(g), dict) else {} for g in GROUPS}
        for old in [k for k in d if k in FLAT_NAMES]:   # group dicts were popped: "checks" here is the old str
            group, new = FLAT_NAMES[old]
            groups[group][new] = d.pop(old)
        for g in GROUPS:
            for k, v in groups[g].items():
                if isinstance(v, list) and k not in ("layers", "layer_weights"):
                    groups[g][k] = tuple(v)
        if isinstance(d.get("fills"), list):
            d["fills"] = tuple(d["fills"])
        return cls(**d, **{g: GROUPS[g](**v) for g, v in groups.items()})


def _regroup(changes: dict, groups: dict, stacklevel: int) -> dict:
    """Moves old flat names in ``changes`` into ``groups`` (dicts of changes per group), warning once
    per name; the explicit group values of ``changes`` are merged with them."""
    changes = dict(changes)
    for name in _DEAD:
        if name in changes:
            changes.pop(name)
            warn_renamed(f"MedCAMConfig({name}=...)", "nothing (it was never read)", stacklevel=stacklevel)
    for old in [k for k in changes if k in FLAT_NAMES and k not in GROUPS]:
        group, new = FLAT_NAMES[old]
        warn_renamed(f"MedCAMConfig({old}=...)", f"MedCAMConfig({group}={{'{new}': ...}})", stacklevel=stacklevel)
        groups[group][new] = changes.pop(old)
    if isinstance(changes.get("checks"), str):
        warn_renamed("MedCAMConfig(checks=...)", "checks={'mode': ...}", stacklevel=stacklevel)
        groups["checks"]["mode"] = changes.pop("checks")
    for name in GROUPS:
        value = changes.get(name)
        if value is None:
            changes[name] = groups[name]
        elif isinstance(value, dict):
            changes[name] = {**value, **groups[name]}
        elif groups[name]:
            changes[name] = value.replace(**groups[name])
    return changes


_dataclass_init = MedCAMConfig.__init__


def _init_accepting_old_names(self, *args, **kwargs):
    kwargs = _regroup(kwargs, dict(fit={}, priors={}, checks={}), stacklevel=4)
    _dataclass_init(self, *args, **{k: v for k, v in kwargs.items() if not (k in GROUPS and v == {})})


_init_accepting_old_names.__doc__ = _dataclass_init.__doc__
MedCAMConfig.__init__ = _init_accepting_old_names


def paper_config(**changes) -> MedCAMConfig:
    """The paper-faithful settings of the authors' code (``mode="paper"``).

    DoubleConv U-Net 32-64-128-256-512, Adam lr 5e-5 for 880 steps; hooks on the stem ReLU and
    layer1..layer4 weighted 1, 2, 2, 4, 8 (cosine on the two shallow layers, channel-normalised MSE
    deeper); act 10, CE 15, KL 5 at temperature 2, area 100, bin 1, TV 500 (8-neighbour),
    robustness 100 as a KL over zeros, gaussian and uniform[-1,1] backgrounds with the hard mask;
    f(x) recomputed every step; straight-through binarisation; baseline 0.
    """
    cfg = MedCAMConfig(
        steps=880, baseline=0.0,
        fit=dict(am_metric="paper", lambda_am=1.0, lambda_rob=1.0, act=10.0, ce=15.0, kl=5.0, kl_temperature=2.0,
                 rob=100.0, background="gaussian", unet_widths=(32, 64, 128, 256, 512), unet_scale=1,
                 unet_upsample="transpose", init_bias=0.0, logit_bound=0.0, standardise=0.0, lr=5e-5, st_slope=0.0,
                 binarize="threshold", ce_mode="plain", check_every=880, min_steps=880),
        priors=dict(lambda_min=1.0, area_weight=100.0, bin=1.0, tv=500.0, tv_diagonal=True),
        checks=dict(repair=False, minimal_search=False),
    )
    return cfg.replace(**changes)


def reference_config(**changes) -> MedCAMConfig:
    """Deprecated name of :func:`paper_config`."""
    warn_renamed("reference_config()", "paper_config()")
    return paper_config(**changes)


def plain_config(**changes) -> MedCAMConfig:
    """A straightforward fast Med-CAM, the "before" of the sufficiency work: the light U-Net for 150
    steps with the seven terms, the paper's straight-through binarisation at 0.5, plain CE, gaussian
    robustness backgrounds, and no counterfactual minimal-evidence search (the 0.5 mask is kept;
    it is only enlarged when it does not keep the label). Kept for the before/after comparison."""
    cfg = MedCAMConfig(
        fit=dict(background="gaussian", binarize="threshold", ce_mode="plain", st_slope=0.0, standardise=0.0,
                 unet_upsample="transpose", init_bias=0.0, unet_scale=2, act=1.0, min_steps=150, check_every=150),
        priors=dict(area_weight=2.0, tv=2.0),
        checks=dict(minimal_search=False, repair=True),
    )
    return cfg.replace(**changes)

"""MedCAMConfig: every knob of a Med-CAM fit, with the fast defaults and the paper's reference set."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MODES = ("fast", "reference")
OBJECTIVES = ("preservation", "deletion", "dual")
CHECKS = ("adaptive", "full")
BACKGROUNDS = ("fills", "counterfactual", "gaussian", "uniform", "blur", "shuffle", "constant")


@dataclass
class MedCAMConfig:
    """Configuration of :func:`medcam_fast.explain`.

    Loss = lambda_am * (act * AM + kl * KL + ce * CE)
         + lambda_min * (area * |m|1 + bin * |m - m^2|1 + tv * TV)
         + lambda_rob * rob * CE(m*x + (1-m)*r)
    with every term a mean (it does not grow with image size). The defaults of ``mode="fast"``
    were chosen on the brain_mri val split (see README, "How the defaults were chosen").
    """

    # --- classifier layers (None: chosen per model family) and their weights
    layers: list[str] | None = None
    layer_weights: list[float] | dict[str, float] | None = None
    am_metric: str = "mse"           # "mse" (channel-normalised), "cosine", or "paper" (cosine on the 2 shallowest)
    # --- loss groups and the weights inside each group
    lambda_am: float = 1.0
    lambda_min: float = 1.0
    lambda_rob: float = 1.0
    act: float = 0.2                 # AM weighs less than the decision terms: it asks for x's activations
                                     # everywhere, so it grows masks past the evidence (tuning_sufficiency_val.md)
    kl: float = 0.5
    ce: float = 1.0
    ce_mode: str = "hinge"           # "hinge": CE only above a floor (sufficient masks feel no push); "plain"
    keep_prob: float = 0.6           # hinge floor: p(label) on e~ (and on e, capped by p(label|x)) to aim for
    ce_temperature: float = 1.0       # plain mode: T * CE(logits / T)
    kl_temperature: float = 2.0
    area: float = 4.0
    bin: float = 0.1
    tv: float = 0.5                  # a thin stroke (the tag's L) has a long outline
    tv_diagonal: bool = True
    rob: float = 2.0
    rob_draws: int = 1               # backgrounds per image per step in the robustness term
    objective: str = "preservation"  # TorchRay's modes: keep the mask ("preservation"), lose the label
                                     # without it ("deletion"), or both ("dual")
    necessary: str | None = "occlusion"  # the necessary side's ranking source (medcam.necessary.NECESSARY_SOURCES:
                                     # "fit", "occlusion", "occlusion+fit", "shared"), chosen on the suite's val
                                     # cases (benchmarks/results/known_evidence_loco.md); None: one side
    dele: float = 1.0                # deletion term: relu(log p(label | (1-m)*x + m*r) - log del_prob)
    del_prob: float = 0.3
    # --- backgrounds r of the robustness term (a new draw each step) and the evidence baseline
    background: str = "fills"        # "fills": one of the image's certified fills per step (no other images)
    baseline: float = 0.0            # value of "removed" pixels, in the model's input space
    # --- the sufficiency test (medcam_fast.medcam.sufficiency)
    fills: tuple[str, ...] = ("baseline", "blur_fine", "blur_coarse", "mean")
    mask_fills: tuple[str, ...] = ()  # mask-dependent fills ("impute"): count where random blobs fail under them
    certify_margin: float = 1.0      # a fill counts when another class beats the label on it alone by this
    keep_margin: float = 0.25        # sufficient: the label leads by min(keep_margin, keep_share * its
    keep_share: float = 0.5          # lead on x) under every counted fill
    n_random: int = 16               # random blobs at the mask's own area, the leakage control
    random_bound: float = 0.2        # ok only when at most this share of them passes too
    checks: str = "adaptive"         # "adaptive": the same decisions in tens of passes (bisected area grid,
                                     # one fill at a time, sequential random controls; medcam.checks);
                                     # "full": every candidate under every fill (the evaluation tables' test)
    random_confidence: float | None = None  # adaptive random controls: None stops only once the full test's
                                     # verdict is fixed (curtailment: exact); a confidence also stops once an
                                     # exact binomial bound clears random_bound (with 16 draws curtailment
                                     # decides first: 0.95 gave the same val statuses and passes)
    skip_untestable: bool = True     # no fit and no occlusion map where no fill is certified: nothing can be
                                     # shown there either way (null_keeps_label); empty masks, steps 0
    audit_counterfactual: bool = False  # also compute kept_robust on other images' context (audit only)
    # --- U-Net explainer
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
    # --- optimisation
    steps: int = 150
    lr: float = 3e-3
    check_every: int = 10            # host syncs only every this many steps
    patience: int = 3                # stop after this many checks in a row with the label kept ...
    plateau: float = 0.1             # ... and the window's loss changing by less than this (relative); 0.1
                                     # stops 9% sooner on val at equal quality (tuning_steps_val.md)
    min_steps: int = 60
    threshold: float = 0.5
    # --- verification, sufficiency and minimality
    repair: bool = True              # search larger masks (lower thresholds) when 0.5 does not keep
    minimal_search: bool = True      # the smallest level set of the soft mask that is sufficient
    # finer below 5%: a* and the mask of a 1% lesion are read off this grid
    area_grid: tuple[float, ...] = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                                    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
    n_robust: int = 32               # composites per image for the kept_robust audit (8 gave a verdict that
                                     # changed with the draw for 26% of val images, 32: 8%; sufficiency_rule_val.md)
    batch_as_reference: bool = True  # the other images of a call serve as counterfactual backgrounds
    robust_threshold: float = 0.9
    min_area: float = 0.005
    max_area: float = 0.9
    # --- batching and precision
    max_batch: int = 32
    amp: bool | None = None          # bf16 autocast of the classifier pass (None: on CUDA only)
    channels_last: bool | None = None  # convolutions in channels-last layout (None: on CPU, 1.5-1.7x measured)
    # --- the fit step (medcam_fast.medcam.step)
    classifier_path: str = "auto"    # the classifier in the fit and the checks: "traced" (one FX graph, BatchNorms
                                     # folded: 1.3x faster on the demo classifier), "hooks" (forward hooks,
                                     # any model), "auto" (traced where FX can trace the model)
    compile: bool = False            # torch.compile(fullgraph=True) of the whole step; off: on this CPU it
                                     # measured slower than eager (README "Speed")
    compile_mode: str = "default"    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), ...
    finished: str | None = None      # finished images: "drop" (the batch shrinks) or "mask" (static shapes);
                                     # None: "mask" when compiled, else "drop"

    def validate(self) -> "MedCAMConfig":
        """Raises ValueError on an inconsistent setting; returns self."""
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.necessary is not None:
            from .necessary import get_necessary_source

            get_necessary_source(self.necessary)
        from .sufficiency import available_fills

        plain_fills, mask_fills = available_fills()
        bad = [f for f in self.fills if f not in plain_fills] + [f for f in self.mask_fills if f not in mask_fills]
        if bad or not self.fills:
            raise ValueError(f"unknown or no fills {bad or list(self.fills)}: fills from {plain_fills}, "
                             f"mask_fills from {mask_fills}")
        if self.checks not in CHECKS:
            raise ValueError(f"checks must be one of {CHECKS}, got {self.checks!r}")
        if self.checks == "adaptive" and self.mask_fills:
            raise ValueError("the adaptive checks cover the mask-independent fills; with mask_fills set checks='full'")
        if self.random_confidence is not None and not 0.5 <= self.random_confidence < 1:
            raise ValueError(f"random_confidence must be None or in [0.5, 1), got {self.random_confidence}")
        if self.n_random < 1 or not 0 <= self.random_bound <= 1:
            raise ValueError("n_random must be >= 1 and random_bound in [0, 1]")
        if not 0 < self.del_prob < 1:
            raise ValueError(f"del_prob must be in (0, 1), got {self.del_prob}")
        if self.am_metric not in ("mse", "cosine", "paper"):
            raise ValueError(f"am_metric must be 'mse', 'cosine' or 'paper', got {self.am_metric!r}")
        if self.ce_mode not in ("hinge", "plain"):
            raise ValueError(f"ce_mode must be 'hinge' or 'plain', got {self.ce_mode!r}")
        if not 0 < self.keep_prob < 1:
            raise ValueError(f"keep_prob must be in (0, 1), got {self.keep_prob}")
        if self.binarize not in ("threshold", "stochastic"):
            raise ValueError(f"binarize must be 'threshold' or 'stochastic', got {self.binarize!r}")
        if not 0 <= self.anneal <= 1:
            raise ValueError(f"anneal must be in [0, 1], got {self.anneal}")
        if self.unet_batching not in ("grouped", "loop", "vmap"):
            raise ValueError(f"unet_batching must be 'grouped', 'loop' or 'vmap', got {self.unet_batching!r}")
        if self.unet_scale not in (0, 1, 2, 4):
            raise ValueError(f"unet_scale must be 0 (auto), 1, 2 or 4, got {self.unet_scale}")
        if self.steps < 1 or self.check_every < 1 or self.max_batch < 1:
            raise ValueError("steps, check_every and max_batch must be >= 1")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.classifier_path not in ("auto", "traced", "hooks"):
            raise ValueError(f"classifier_path must be 'auto', 'traced' or 'hooks', got {self.classifier_path!r}")
        if self.finished not in (None, "drop", "mask"):
            raise ValueError(f"finished must be None, 'drop' or 'mask', got {self.finished!r}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be a torch.compile mode, got {self.compile_mode!r}")
        if self.compile and self.finished == "drop":   # the compiled step keeps the whole batch's U-Net stack
            raise ValueError("compile=True needs finished='mask' (or None): a compiled step cannot drop the images "
                             "that finish")
        if not self.mask_temperature > 0:               # a divisor of the mask logits
            raise ValueError(f"mask_temperature must be > 0, got {self.mask_temperature}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.patience < 1 or self.min_steps < 0:
            raise ValueError(f"patience must be >= 1 and min_steps >= 0, got {self.patience} and {self.min_steps}")
        grid = tuple(self.area_grid)
        if not grid or any(not 0 < a <= 1 for a in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"area_grid must be increasing areas in (0, 1], got {grid}")
        if self.rob_draws < 1:
            raise ValueError(f"rob_draws must be >= 1, got {self.rob_draws}")
        if self.n_robust < 1:
            raise ValueError("n_robust must be >= 1")
        for name in ("lambda_am", "lambda_min", "lambda_rob", "act", "kl", "ce", "area", "bin", "tv", "rob", "dele",
                     "certify_margin", "keep_margin", "keep_share"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self

    def replace(self, **changes) -> "MedCAMConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def reference_config(**changes) -> MedCAMConfig:
    """The paper-faithful settings of the authors' code (``mode="reference"``).

    DoubleConv U-Net 32-64-128-256-512, Adam lr 5e-5 for 880 steps; hooks on the stem ReLU and
    layer1..layer4 weighted 1, 2, 2, 4, 8 (cosine on the two shallow layers, channel-normalised MSE
    deeper); act 10, CE 15, KL 5 at temperature 2, area 100, bin 1, TV 500 (8-neighbour),
    robustness 100 as a KL over zeros, gaussian and uniform[-1,1] backgrounds with the hard mask;
    f(x) recomputed every step; straight-through binarisation; baseline 0.
    """
    cfg = MedCAMConfig(
        am_metric="paper", lambda_am=1.0, lambda_min=1.0, lambda_rob=1.0,
        act=10.0, ce=15.0, kl=5.0, kl_temperature=2.0, area=100.0, bin=1.0, tv=500.0, tv_diagonal=True,
        rob=100.0, background="gaussian", baseline=0.0,
        unet_widths=(32, 64, 128, 256, 512), unet_scale=1, unet_upsample="transpose", init_bias=0.0,
        logit_bound=0.0, standardise=0.0,
        steps=880, lr=5e-5, st_slope=0.0, binarize="threshold", ce_mode="plain", check_every=880, min_steps=880, repair=False, minimal_search=False,
    )
    return replace(cfg, **changes)


def plain_config(**changes) -> MedCAMConfig:
    """A straightforward fast Med-CAM, the "before" of the sufficiency work: the light U-Net for 150
    steps with the seven terms, the paper's straight-through binarisation at 0.5, plain CE, gaussian
    robustness backgrounds, and no counterfactual minimal-evidence search (the 0.5 mask is kept;
    it is only enlarged when it does not keep the label). Kept for the before/after comparison."""
    cfg = MedCAMConfig(background="gaussian", binarize="threshold", ce_mode="plain", st_slope=0.0, standardise=0.0,
                       unet_upsample="transpose", init_bias=0.0, unet_scale=2, act=1.0, area=2.0, tv=2.0, minimal_search=False, repair=True,
                       min_steps=150, check_every=150)
    return replace(cfg, **changes)

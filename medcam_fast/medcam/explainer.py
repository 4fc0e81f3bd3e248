"""``Explainer`` (reusable, thread-safe) and ``explain`` (one call): validation, the fit, and the
checks that decide what the binary mask may claim."""
from __future__ import annotations

import math
import threading
import time
import warnings

import torch
from torch import nn
from torch.profiler import record_function

from ..models.adapter import FrozenClassifier, check_traced
from .backgrounds import BackgroundSampler
from .config import MODES, MedCAMConfig, paper_config
from .amortised_store import resolve
from .counterfactual import build_pool
from .fit import fit_fast, fit_paper, fit_targets
from .full_checks import verify_sufficient
from .step import resolve_compile
from .unet import resolve_channels_last
from .result import Explanation
from . import sufficiency
from .checks import adaptive_checks
from .necessary import get_necessary_source, verify_necessary, with_statuses
from .inputs import renamed_arguments, validate_refine, validate_target, validate_x
from .verify import is_oom, status_of

class _Counting:
    """``forward`` counting the images it classifies (the full checks' passes)."""

    def __init__(self, forward):
        self.forward, self.images = forward, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.forward(x)

    def take(self) -> int:
        n, self.images = self.images, 0
        return n


class Explainer:
    """A reusable Med-CAM explainer for one classifier; ``explainer(x)`` returns an Explanation.

    Args:
        model: maps ``[N,C,H,W]`` to logits ``[N,K]``. It is frozen during each call and left
            exactly as it was (parameters, training flags, ``requires_grad``).
        config: a :class:`MedCAMConfig` (default: the fast defaults, or the paper's for
            ``mode="paper"``).
        mode: "fast" (default) or "paper" (the authors' procedure; slow; once "reference").
        device: where to run; default the model's device. Inputs are moved there. The model is
            never moved: a ``device`` other than the model's raises ValueError.
        forward: optional callable for the gradient-free passes (labels, verification), e.g. an
            ``OrtClassifier``; gradient passes always use ``model``.
        counterfactuals: optional ``[P,C,H,W]`` other images whose context replaces the removed
            pixels in the counterfactual audit (once ``reference``).
        amortised: optional amortised explainer (a saved ``.safetensors`` path or an
            :class:`~medcam_fast.amortised.AmortisedExplainer`): masks from its one forward pass
            instead of the per-image fit, checked by the same test. Refused (ValueError) when it
            was trained against other weights or, at a call, on another input shape.
        refine: with ``amortised``, per-image fit steps warm-started from its mask (0: none).

    Thread-safe: concurrent calls share the frozen model and hooks (reference-counted) and keep
    their activations per thread.
    """

    def __init__(self, model: nn.Module, config: MedCAMConfig | None = None, mode: str = "fast", device=None,
                 forward=None, counterfactuals: torch.Tensor | None = None, amortised=None, refine: int = 0,
                 reference: torch.Tensor | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        mode, counterfactuals = renamed_arguments(mode, counterfactuals, reference)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.config = (config or (paper_config() if mode == "paper" else MedCAMConfig())).validate()
        self.model = model
        self.classifier = FrozenClassifier(model, self.config.fit.layers, self.config.fit.layer_weights)
        model_device = self.classifier.device
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type != model_device.type or (self.device.index is not None and self.device != model_device):
            raise ValueError(f"device {self.device} differs from the model's device {model_device}; move the model "
                             "first (explain never moves your model)")
        self.forward = forward
        self.counterfactuals = counterfactuals
        self.amortised, self.refine = None, validate_refine(refine, amortised)
        if amortised is not None:
            if mode == "paper":
                raise ValueError("mode='paper' fits each image as the paper does; it takes no amortised explainer")
            self.amortised = resolve(amortised, model, self.device)
        self.classifier_path: str | None = None    # "traced" or "hooks", chosen on the first call
        self._path_lock = threading.Lock()

    def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward is not None:
            out = self.forward(x)
        elif self.classifier_path == "traced":   # the folded graph: the same logits, faster
            out = self.classifier.traced_graph.forward(x)
        else:
            out = self.classifier.forward(x)
        return out.to(x.device, x.dtype) if out.device != x.device else out

    def _prepare_classifier(self, x: torch.Tensor, hooked, channels_last: bool):
        """Inside the session: the classifier view of the gradient and the frozen passes, chosen
        once per Explainer (``cfg.fit.classifier_path``: "traced", the FX graph with BatchNorms folded,
        1.3x faster on the demo classifier; "hooks"; "auto" = traced where FX can trace the model),
        its folded weights refreshed from the model's; ``hooked`` = (logits, activations) of ``x``
        from the hooks, the check of the traced view on the first call. Returns it, or None."""
        cfg = self.config
        with self._path_lock:
            if self.classifier_path is None:
                want = "traced" if resolve_compile(cfg, self.device) else cfg.fit.classifier_path
                if want == "hooks":
                    self.classifier_path = "hooks"
                else:
                    try:
                        check_traced(self.classifier.traced(channels_last), x, hooked)
                        self.classifier_path = "traced"
                    except ValueError:
                        if want == "traced":
                            raise
                        self.classifier_path = "hooks"   # FX cannot trace it: the hooks, as before
                return self.classifier.traced_graph if self.classifier_path == "traced" else None
        return self.classifier.traced(channels_last) if self.classifier_path == "traced" else None

    def __call__(self, x: torch.Tensor, target=None, seed: int = 0, counterfactuals=None, refine: int | None = None,
                 reference=None) -> Explanation:
        """Explains ``x`` ``[C,H,W]`` or ``[N,C,H,W]`` for ``target`` (None: the top-1 label);
        ``refine`` overrides the Explainer's (amortised only)."""
        start = time.perf_counter()
        cfg = self.config
        refine = self.refine if refine is None else validate_refine(refine, self.amortised)
        x = validate_x(x).to(self.device)
        if self.amortised is not None:
            self.amortised.check_input(x)
        counterfactuals = renamed_arguments(self.mode, counterfactuals, reference)[1]
        counterfactuals = counterfactuals if counterfactuals is not None else self.counterfactuals
        try:
            self.classifier.prepare(x)
        except RuntimeError as exc:
            if is_oom(exc):   # not a bad input: said as what it is
                raise
            raise ValueError(f"the model cannot take x of shape {tuple(x.shape)} (channels or size do not "
                             f"fit it): {exc}") from exc
        channels_last = resolve_channels_last(cfg, self.device)
        with self.classifier.session(channels_last=channels_last):
            with torch.no_grad():
                try:
                    logits_x, feats_x = self.classifier.forward(x, with_activations=True)
                except RuntimeError as exc:
                    if is_oom(exc):
                        raise
                    raise ValueError(f"the model cannot take x of shape {tuple(x.shape)} (channels or size do not "
                                     f"fit it): {exc}") from exc
            if not torch.is_tensor(logits_x) or logits_x.dim() != 2 or logits_x.shape[0] != x.shape[0] \
                    or logits_x.shape[1] < 2:
                shape = tuple(logits_x.shape) if torch.is_tensor(logits_x) else type(logits_x).__name__
                raise ValueError(f"the model must return logits [N,K] with K >= 2 for x [N,C,H,W]; got {shape}")
            step_clf = self._prepare_classifier(x, (logits_x, feats_x), channels_last)
            if step_clf is not None:   # the targets from the same view as the fit's passes
                with torch.no_grad():
                    logits_x, feats_x = step_clf.forward(x, with_activations=True)
            n, k = logits_x.shape
            label = validate_target(target, n, k, x.device)
            label = logits_x.argmax(1) if label is None else label
            # f(x) comes from the torch pass that also gives the activation targets (needed anyway)
            prob_input = logits_x.softmax(1).gather(1, label[:, None])[:, 0]

            # null audit: the baseline image alone
            with torch.no_grad():
                null_logits = self._frozen_forward(torch.full_like(x[:1], cfg.baseline))
            prob_null = null_logits.softmax(1)[0, label]
            null_keeps = null_logits.argmax(1)[0] == label

            with record_function("medcam.certify_fills"):
                fills = sufficiency.certify(self._frozen_forward, x, label, cfg.fills, cfg.baseline,
                                            cfg.checks.certify_margin, cfg.max_batch, cfg.checks.mask_fills)
            pool = None
            if cfg.fit.background == "counterfactual" or cfg.checks.audit_counterfactual:
                pool = build_pool(self._frozen_forward, x, label, counterfactuals, cfg.checks.n_robust, seed, cfg.max_batch,
                                  cfg.checks.batch_as_counterfactuals)
            logits, steps, ranking = self._rankings(x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine)
            soft = torch.sigmoid(logits / cfg.fit.mask_temperature)
            need = sufficiency.required_margin(sufficiency.margins(logits_x.detach(), label), cfg.checks.keep_margin,
                                               cfg.checks.keep_share)
            verdict, necessary = self._check(x, label, logits.detach(), ranking, fills, pool, need, seed)
            if necessary is not None:
                necessary["logits"] = ranking[:, 0]
        statuses, reasons = [], []
        for i in range(n):
            s, r = status_of(bool(verdict["sufficient"][i]), bool(verdict["testable"][i]),
                             float(verdict["random_pass"][i]), float(verdict["area"][i]), cfg,
                             ", ".join(fills.names), fills.described(i, verdict["use"]))
            statuses.append(s)
            reasons.append(r)
        kept = verdict["kept"]
        if not bool(kept.all()):
            warnings.warn(f"medcam_fast: {int((~kept).sum())} of {n} binary mask(s) do not keep the label on the "
                          "blank baseline (returned with kept_on_baseline=False)", RuntimeWarning, stacklevel=2)
        mf = verdict["mask"][:, None].to(x.dtype)
        evidence = mf * x + (1 - mf) * cfg.baseline
        cpu = {k: v.cpu() for k, v in verdict.items() if torch.is_tensor(v) and k != "use"}
        two = {}
        if necessary is not None:
            two = {f"necessary_{k}": v.cpu() if torch.is_tensor(v) else v for k, v in necessary.items()
                   if k not in ("use", "testable")}
        return Explanation(
            mask=cpu["mask"], soft_mask=soft[:, 0].detach().cpu(), evidence=evidence.detach().cpu(),
            label=label.cpu(), prob_input=prob_input.cpu(), prob_evidence=cpu["prob_evidence"],
            kept_on_baseline=cpu["kept"], area=cpu["area"], steps=steps, seconds=time.perf_counter() - start,
            prob_null=prob_null.cpu(), null_keeps_label=null_keeps.cpu(), kept_robust=cpu["kept_robust"],
            status=statuses, reason=reasons, selection=verdict["selection"],
            backgrounds=pool.description if pool is not None else "", mode=self.mode,
            sufficient=cpu["sufficient"], margin=cpu["margin"], flipped_when_removed=cpu["flipped"],
            prob_removed=cpu["prob_removed"], random_pass=cpu["random_pass"], shape_keeps_label=cpu["shape_keeps"],
            a_star=cpu["a_star"], curve_areas=tuple(cfg.checks.area_grid), evidence_curve=cpu["curve"],
            certified_fills=[fills.described(i, verdict["use"]) for i in range(n)],
            mask_logits=logits[:, 0].detach().cpu(),
            source="fit" if self.amortised is None else "amortised+refine" if refine else "amortised",
            n_random=cfg.checks.n_random, checks=cfg.checks.mode, check_passes=cpu["check_passes"],
            random_draws=cpu["random_draws"], **two)

    def _rankings(self, x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine):
        """Both sides' mask logits ``[N,1,H,W]`` (the necessary side's None when it is off) and the
        fit's steps ``[N]``. With ``skip_untestable`` only the images with a certified fill are
        fitted and occluded: elsewhere nothing can be shown either way (``null_keeps_label``), so
        their logits are a constant below the threshold (an empty mask) and their steps 0."""
        cfg, n = self.config, x.shape[0]
        rows = None
        if (cfg.checks.skip_untestable and self.mode == "fast" and not cfg.checks.mask_fills
                and cfg.fit.background != "counterfactual"):
            testable = fills.certified.any(1)
            rows = None if bool(testable.all()) else testable.nonzero().flatten()
        if rows is None:
            return self._rank(x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine)
        thr_logit = cfg.fit.mask_temperature * math.log(cfg.fit.threshold / (1 - cfg.fit.threshold))
        logits = torch.full((n, 1, *x.shape[2:]), thr_logit - 1.0, device=x.device, dtype=x.dtype)
        steps = torch.zeros(n, dtype=torch.long)
        ranking = None if cfg.necessary is None else logits.clone()
        if rows.numel():
            sub = self._rank(x[rows], label[rows], logits_x[rows], [f[rows] for f in feats_x], None, fills.select(rows),
                             seed, step_clf, refine)
            logits[rows], steps[rows.cpu()] = sub[0].to(logits.dtype), sub[1]
            if ranking is not None:
                ranking[rows] = sub[2].to(ranking.dtype)
        return logits, steps, ranking

    def _rank(self, x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine):
        """:meth:`_rankings` of every image of ``x``."""
        cfg = self.config
        # record_function ranges: the stages a torch.profiler run reports (benchmarks/profile_explain.py)
        with record_function("medcam.sufficient_ranking"):
            if self.amortised is None:
                logits, steps = self._fit(x, label, logits_x, feats_x, pool, fills, seed, step_clf)
            else:
                logits, steps = self._amortised(x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine)
        ranking = None
        if cfg.necessary is not None:
            ctx = {"x": x, "label": label, "logits_x": logits_x, "feats_x": feats_x, "pool": pool,
                   "fills": fills, "seed": seed, "step_clf": step_clf, "sufficient_logits": logits.detach()}
            with record_function("medcam.necessary_ranking"):
                ranking = get_necessary_source(cfg.necessary)(self, ctx).detach()
        return logits.detach(), steps, ranking

    def _check(self, x, label, logits, ranking, fills, pool, need, seed) -> tuple[dict, dict | None]:
        """Both sides' checks (``ranking`` None: the sufficient side alone) by ``config.checks``:
        "adaptive" (:mod:`.checks`, both sides batched together) or "full" (every candidate under
        every fill). Each verdict carries ``check_passes`` ``[N]``: the classifier passes its side
        spent per image (the full test's are the same for every image)."""
        cfg, fwd, n = self.config, self._frozen_forward, x.shape[0]
        if cfg.checks.mode == "adaptive":
            with record_function("medcam.checks"):
                verdict, necessary = adaptive_checks(fwd, x, label, logits, ranking, fills, pool, need, cfg, seed)
            return verdict, None if necessary is None else with_statuses(necessary, fills, cfg)
        counter = _Counting(fwd)
        with record_function("medcam.sufficient_checks"):
            verdict = verify_sufficient(counter, x, label, logits, fills, pool, need, cfg, seed)
        verdict["check_passes"] = torch.full((n,), counter.take() // n)
        necessary = None
        if ranking is not None:
            with record_function("medcam.necessary_checks"):
                necessary = verify_necessary(counter, x, label, ranking, fills, cfg, seed)
            necessary["check_passes"] = torch.full((n,), counter.take() // n)
        for v in (verdict, necessary):
            if v is not None:   # every draw is run
                v["random_draws"] = torch.where(v["testable"].cpu(), cfg.checks.n_random, 0)
        return verdict, necessary

    def _amortised(self, x, label, logits_x, feats_x, pool, fills, seed, step_clf, refine: int):
        """The amortised explainer's mask logits ``[N,1,H,W]`` (one pass per ``max_batch``), then
        ``refine`` per-image fit steps from them (the U-Net's logits added, starting at 0)."""
        cfg = self.config
        with torch.no_grad():
            base = torch.cat([self.amortised(x[s:s + cfg.max_batch], label[s:s + cfg.max_batch])
                              for s in range(0, x.shape[0], cfg.max_batch)]).to(x.dtype)
        if not refine:
            return base, torch.zeros(x.shape[0], dtype=torch.long)
        # exactly `refine` steps: one check at the end, no early stop
        cfg = cfg.replace(steps=refine, fit=dict(min_steps=refine, check_every=refine))
        return self._fit(x, label, logits_x, feats_x, pool, fills, seed, step_clf, base=base, cfg=cfg)

    def _fit(self, x, label, logits_x, feats_x, pool, fills, seed, step_clf=None, base=None, cfg=None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits ``[N,1,H,W]`` and steps ``[N]``, warm-started from ``base`` ``[N,1,H,W]``
        logits when given; nothing here lives on ``self`` (thread safety)."""
        cfg = cfg or self.config
        if self.mode == "paper":
            fit = fit_paper(self.classifier, x, label, cfg, seed)
            return fit.logits, fit.steps.cpu()
        n = x.shape[0]
        logits = torch.empty(n, 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        steps = torch.zeros(n, dtype=torch.long)
        chunks = [(s, min(n, s + cfg.max_batch)) for s in range(0, n, cfg.max_batch)]
        while chunks:  # a chunk that runs out of memory is halved and retried; results go by index
            s, e = chunks.pop(0)
            sl = slice(s, e)
            targets = fit_targets(logits_x[sl], [f[sl] for f in feats_x], label[sl])
            try:
                fit = fit_fast(self.classifier, x[sl], label[sl], targets, self._sampler(x[sl], pool, fills, sl, seed),
                               cfg, seed, step_clf=step_clf, base=None if base is None else base[sl])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or e - s == 1:
                    raise
                if x.is_cuda:
                    torch.cuda.empty_cache()
                mid = (s + e) // 2
                chunks[:0] = [(s, mid), (mid, e)]
                warnings.warn(f"medcam_fast: out of memory fitting {e - s} images at once; halving to {mid - s}",
                              RuntimeWarning, stacklevel=3)
                continue
            logits[sl] = fit.logits
            steps[sl] = fit.steps
        return logits, steps

    def _sampler(self, xs, pool, fills, sl, seed) -> BackgroundSampler:
        """The robustness term's backgrounds: the images' own certified fills (``"fills"``; all
        fills for an image with none certified), other images (``"counterfactual"``), or a kind."""
        cfg = self.config
        draws = cfg.steps * cfg.fit.rob_draws
        if cfg.fit.background == "fills":
            f = fills.images.shape[1]
            eligible = []
            for i in range(sl.start, sl.stop):
                ok = fills.certified[i].nonzero().flatten().cpu()
                eligible.append(i * f + (ok if ok.numel() else torch.arange(f)))
            return BackgroundSampler("fills", xs, seed, pool=fills.images.flatten(0, 1), eligible=eligible,
                                     draws=draws)
        if cfg.fit.background == "counterfactual":
            eligible = pool.train_eligible[sl]
            if all(e.numel() > 0 for e in eligible):
                return BackgroundSampler("counterfactual", xs, seed, pool=pool.images, eligible=eligible,
                                         draws=draws)
            warnings.warn("medcam_fast: no counterfactual background for some images; the robustness term uses "
                          "gaussian noise for this batch", RuntimeWarning, stacklevel=3)
            return BackgroundSampler("gaussian", xs, seed)
        return BackgroundSampler(cfg.fit.background, xs, seed, constant=cfg.baseline)


def explain(model: nn.Module, x: torch.Tensor, target=None, config: MedCAMConfig | None = None, mode: str = "fast",
            device=None, seed: int = 0, counterfactuals: torch.Tensor | None = None, forward=None, amortised=None,
            refine: int = 0, reference: torch.Tensor | None = None) -> Explanation:
    """Med-CAM: the smallest binary evidence in ``x`` that keeps ``model``'s decision, checked,
    and (by default, ``config.necessary``) the smallest region whose removal changes it, checked.

    Args:
        model: maps ``[N,C,H,W]`` to logits ``[N,K]``; left exactly as it was.
        x: ``[C,H,W]`` or ``[N,C,H,W]``, preprocessed as the model expects.
        target: None (the top-1 label of f(x)), an int, or a ``[N]`` tensor of class indices.
        config: :class:`MedCAMConfig`; default the fast defaults (or the paper's for ``mode="paper"``).
        mode: "fast" or "paper" (once "reference").
        device: default the model's device (x is moved there; the model never is).
        seed: seeds the U-Nets and the backgrounds: the same seed gives the same mask.
        counterfactuals: optional ``[P,C,H,W]`` images for the counterfactual audit (``checks.audit_counterfactual``)
            or ``background="counterfactual"``; never needed by the default test.
        forward: optional callable for the gradient-free passes (e.g. an OrtClassifier).
        amortised, refine: masks from an amortised explainer's one pass, optionally refined by
            ``refine`` fit steps (see :class:`Explainer`).

    Returns:
        :class:`Explanation` with ``mask`` ``[N,H,W]`` bool, ``sufficient`` ``[N]`` (the test of
        :mod:`medcam_fast.medcam.sufficiency`), ``random_pass``, ``a_star``, ``evidence_curve``,
        ``status``; the necessary side's ``necessary_mask`` ``[N,H,W]``, ``necessary_logits``,
        ``necessary_random_pass``, ``necessary_status``; ``headline(i)``; and the rest (see its docstring).
    """
    mode, counterfactuals = renamed_arguments(mode, counterfactuals, reference)
    return Explainer(model, config, mode=mode, device=device, forward=forward, counterfactuals=counterfactuals,
                     amortised=amortised, refine=refine)(
        x, target=target, seed=seed)

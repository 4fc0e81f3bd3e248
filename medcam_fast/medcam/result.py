"""The Explanation returned by :func:`medcam_fast.explain`: always batched with a leading N."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .._deprecation import warn_renamed


def _renamed(result, old: str, new: str):
    warn_renamed(f"Explanation.{old}", f"Explanation.{new}", stacklevel=4)
    return getattr(result, new)


@dataclass
class Explanation:
    """Med-CAM result for N images.

    Attributes:
        mask: bool ``[N,H,W]``, the binary evidence.
        soft_mask: float ``[N,H,W]`` in [0,1], the U-Net's mask (sigmoid of ``mask_logits``; it
            saturates, so ties at 1 are common).
        mask_logits: float ``[N,H,W]``, the U-Net's mask logits (once ``ranking``): the order in which pixels are kept
            (the candidates, a* and the evidence curve are its top-a level sets).
        evidence: float ``[N,C,H,W]`` = mask*x + (1-mask)*baseline.
        label: long ``[N]``, the explained class.
        prob_input, prob_evidence: float ``[N]``, softmax p(label) on x and on the evidence.
        kept_on_baseline: bool ``[N]``, argmax f(evidence) == label on the blank baseline (once ``kept``; checked, never
            assumed; vacuous where the blank alone gives the label: see ``sufficient``).
        area: float ``[N]``, the fraction of pixels in the mask.
        steps: long ``[N]``, fit steps taken.
        seconds: wall time of the call.
        prob_null: float ``[N]``, p(label) on the baseline image alone (the "blank image").
        null_keeps_label: bool ``[N]``, the blank image alone already gives the label.
        kept_robust: float ``[N]``, audit only (``audit_counterfactual``): the fraction of composites
            mask*x + (1-mask)*x' that keep the label, x' of another label (NaN when not computed).
        status: per image "ok", "null_keeps_label", "not_informative", "not_minimal" or "not_kept".
        reason: per image, why that status; selection: which candidate became the mask.
        backgrounds: how the counterfactual backgrounds were drawn ("" when none were).
        sufficient: bool ``[N]``, the label kept by ``keep_margin`` under every certified fill
            (:mod:`medcam_fast.medcam.sufficiency`); margin: float ``[N]``, the worst such margin.
        flipped_when_removed: bool ``[N]``, the label lost with the mask removed, under every
            certified fill; prob_removed: float ``[N]``, the highest p(label) then.
        random_pass: float ``[N]``, the share of random blobs at the mask's area that pass the same
            test (the leakage control; ``ok`` needs it <= ``random_bound``); random_draws: long
            ``[N]``, how many were drawn (``checks="adaptive"`` stops once the verdict is settled,
            and draws none, NaN rate, where the side did not pass: the status is decided without it).
        checks: "adaptive" or "full" (``MedCAMConfig.checks.mode``); check_passes: long ``[N]``, the
            classifier passes the sufficient side's checks spent per image (necessary_check_passes:
            the necessary side's; the ranking and the fills not included).
        shape_keeps_label: bool ``[N]``, the mask's outline alone (no content of x) gives the label.
        a_star: float ``[N]``, the smallest area of ``curve_areas`` at which the ranking's top pixels
            are sufficient (NaN: none is); evidence_curve: float ``[N,A]``, worst-case p(label)
            under the certified fills against ``curve_areas`` (NaN where none is certified).
        certified_fills: per image, the fills that counted.
        necessary_*: the necessary side (``config.necessary``; None or [] when it is off): the
            smallest region whose removal loses the call under every certified fill.
            necessary_mask bool ``[N,H,W]``; necessary_logits ``[N,H,W]`` its logits (once ``necessary_ranking``);
            necessary_area, necessary_prob_removed (highest p(label) with it removed),
            necessary_random_pass (share of random regions of its area whose removal loses the
            call too; necessary_random_draws of them), necessary_a_star ``[N]``; necessary_flipped bool ``[N]``;
            necessary_new_label long ``[N]`` (the call without it); necessary_curve ``[N,A]``;
            necessary_status ("ok", "null_keeps_label", "not_flipped", "not_informative",
            "not_minimal"), necessary_reason, necessary_selection: per image.
        source: where the mask logits came from: "fit" (the per-image fit), "amortised" (one pass
            of an amortised explainer) or "amortised+refine" (warm-started fit steps).
    """

    mask: torch.Tensor
    soft_mask: torch.Tensor
    evidence: torch.Tensor
    label: torch.Tensor
    prob_input: torch.Tensor
    prob_evidence: torch.Tensor
    kept_on_baseline: torch.Tensor
    area: torch.Tensor
    steps: torch.Tensor
    seconds: float
    prob_null: torch.Tensor
    null_keeps_label: torch.Tensor
    kept_robust: torch.Tensor
    status: list[str]
    reason: list[str] = field(default_factory=list)
    selection: list[str] = field(default_factory=list)
    backgrounds: str = ""
    mode: str = "fast"
    sufficient: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    flipped_when_removed: torch.Tensor | None = None
    prob_removed: torch.Tensor | None = None
    random_pass: torch.Tensor | None = None
    shape_keeps_label: torch.Tensor | None = None
    a_star: torch.Tensor | None = None
    curve_areas: tuple[float, ...] = ()
    evidence_curve: torch.Tensor | None = None
    certified_fills: list[str] = field(default_factory=list)
    mask_logits: torch.Tensor | None = None
    source: str = "fit"
    necessary_mask: torch.Tensor | None = None
    necessary_logits: torch.Tensor | None = None
    necessary_area: torch.Tensor | None = None
    necessary_flipped: torch.Tensor | None = None
    necessary_prob_removed: torch.Tensor | None = None
    necessary_new_label: torch.Tensor | None = None
    necessary_random_pass: torch.Tensor | None = None
    necessary_a_star: torch.Tensor | None = None
    necessary_curve: torch.Tensor | None = None
    necessary_status: list[str] = field(default_factory=list)
    necessary_reason: list[str] = field(default_factory=list)
    necessary_selection: list[str] = field(default_factory=list)
    n_random: int = 0
    checks: str = "full"
    check_passes: torch.Tensor | None = None
    random_draws: torch.Tensor | None = None
    necessary_check_passes: torch.Tensor | None = None
    necessary_random_draws: torch.Tensor | None = None

    # the old names, for one release
    ranking = property(lambda self: _renamed(self, "ranking", "mask_logits"))
    necessary_ranking = property(lambda self: _renamed(self, "necessary_ranking", "necessary_logits"))
    kept = property(lambda self: _renamed(self, "kept", "kept_on_baseline"))

    @property
    def two_sided(self) -> bool:
        """Whether the necessary side was computed."""
        return self.necessary_mask is not None

    def headline(self, i: int, class_names=None) -> str:
        """Image ``i``'s result in one or two sentences a clinician reads: which side carries
        evidence, with its area and its random control."""
        def name(c):
            return class_names[int(c)] if class_names else f"class {int(c)}"

        def draws(rate, drawn):
            k = int(drawn[i]) if drawn is not None else self.n_random
            return f"{round(float(rate) * k)} of {k} draws" if k else f"{float(rate):.0%}"

        call = name(self.label[i])
        parts = []
        if self.two_sided and self.necessary_status[i] == "ok":
            parts.append(f"Removing this region ({float(self.necessary_area[i]):.1%} of the image) changes the call "
                         f"from {call} to {name(self.necessary_new_label[i])}; random regions of that size do so in "
                         f"{draws(self.necessary_random_pass[i], self.necessary_random_draws)}.")
        if self.status[i] == "ok":
            rp = self.random_pass[i] if self.random_pass is not None else float("nan")
            parts.append(f"This region alone ({float(self.area[i]):.1%} of the image) keeps the call {call}; random "
                         f"regions of that size do so in {draws(rp, self.random_draws)}.")
        if parts:
            return " ".join(parts)
        if self.status[i] == "null_keeps_label":
            return (f"No evidence can be shown for {call}: every fill of the image alone already gives it, so "
                    "neither keeping nor removing pixels can be told from the fill.")
        sides = "neither the region it keeps nor one it removes" if self.two_sided else "no region it keeps"
        return (f"No evidence passes the checks for {call}: {sides} could be told from random regions "
                f"({self.status[i]}" + (f", {self.necessary_status[i]}" if self.two_sided else "") + ").")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, index) -> "Explanation":
        """The Explanation of images ``index`` (an int, a slice or a list of ints): every ``[N,...]``
        tensor and per-image list sliced on N, the rest (``seconds``, ``curve_areas``, ...) kept."""
        rows = [index] if isinstance(index, int) else list(range(len(self)))[index] if isinstance(index, slice) \
            else [int(i) for i in index]
        n, out = len(self), {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
                out[f.name] = v[rows]
            elif isinstance(v, list) and len(v) == n:
                out[f.name] = [v[i] for i in rows]
            else:
                out[f.name] = v
        return Explanation(**out)

    @classmethod
    def concat(cls, parts: list["Explanation"]) -> "Explanation":
        """One Explanation of the images of ``parts`` in order (the inverse of :meth:`select`):
        per-image tensors and lists joined, ``seconds`` summed, the rest from the first part."""
        if not parts:
            raise ValueError("concat needs at least one Explanation")
        out = {}
        for f in fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            per_image = [(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(p)) or
                         (isinstance(v, list) and len(v) == len(p)) for v, p in zip(vals, parts)]
            if all(per_image):
                out[f.name] = torch.cat(vals) if torch.is_tensor(vals[0]) else [e for v in vals for e in v]
            elif f.name == "seconds":
                out[f.name] = sum(vals)
            else:
                out[f.name] = vals[0]
        return cls(**out)

    def rows(self, class_names=None) -> list[dict]:
        """One plain dict per image (for tables, JSON and reports)."""
        out = []
        for i in range(len(self)):
            lab = int(self.label[i])
            out.append({
                "label": lab,
                "class_name": class_names[lab] if class_names else str(lab),
                "prob_input": float(self.prob_input[i]),
                "prob_evidence": float(self.prob_evidence[i]),
                "kept_on_baseline": bool(self.kept_on_baseline[i]),
                "kept_robust": float(self.kept_robust[i]),
                "area": float(self.area[i]),
                "prob_null": float(self.prob_null[i]),
                "null_keeps_label": bool(self.null_keeps_label[i]),
                "status": self.status[i],
                "reason": self.reason[i] if self.reason else "",
                "selection": self.selection[i] if self.selection else "",
                "sufficient": _opt(self.sufficient, i, bool),
                "margin": _opt(self.margin, i, float),
                "flipped_when_removed": _opt(self.flipped_when_removed, i, bool),
                "prob_removed": _opt(self.prob_removed, i, float),
                "random_pass": _opt(self.random_pass, i, float),
                "shape_keeps_label": _opt(self.shape_keeps_label, i, bool),
                "a_star": _opt(self.a_star, i, float),
                "curve_areas": list(self.curve_areas),
                "evidence_curve": [] if self.evidence_curve is None else [float(v) for v in self.evidence_curve[i]],
                "certified_fills": self.certified_fills[i] if self.certified_fills else "",
                "steps": int(self.steps[i]),
                "source": self.source,
                "checks": self.checks,
                "check_passes": _opt(self.check_passes, i, int),
                "random_draws": _opt(self.random_draws, i, int),
                "seconds": self.seconds / max(len(self), 1),
                "headline": self.headline(i, class_names),
            })
            if self.two_sided:
                new = int(self.necessary_new_label[i])
                out[-1].update({
                    "necessary_status": self.necessary_status[i],
                    "necessary_reason": self.necessary_reason[i],
                    "necessary_selection": self.necessary_selection[i],
                    "necessary_area": float(self.necessary_area[i]),
                    "necessary_flipped": bool(self.necessary_flipped[i]),
                    "necessary_prob_removed": float(self.necessary_prob_removed[i]),
                    "necessary_new_label": new,
                    "necessary_new_class_name": class_names[new] if class_names else str(new),
                    "necessary_random_pass": float(self.necessary_random_pass[i]),
                    "necessary_a_star": float(self.necessary_a_star[i]),
                    "necessary_curve": [float(v) for v in self.necessary_curve[i]],
                    "necessary_check_passes": _opt(self.necessary_check_passes, i, int),
                    "necessary_random_draws": _opt(self.necessary_random_draws, i, int),
                })
        return out


def _opt(t, i, kind):
    return None if t is None else kind(t[i])

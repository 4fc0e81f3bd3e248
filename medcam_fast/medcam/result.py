"""The Explanation returned by :func:`medcam_fast.explain`: always batched with a leading N."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Explanation:
    """Med-CAM result for N images.

    Attributes:
        mask: bool ``[N,H,W]``, the binary evidence.
        soft_mask: float ``[N,H,W]`` in [0,1], the U-Net's mask (it ranks pixels).
        evidence: float ``[N,C,H,W]`` = mask*x + (1-mask)*baseline.
        label: long ``[N]``, the explained class.
        prob_input, prob_evidence: float ``[N]``, softmax p(label) on x and on the evidence.
        kept: bool ``[N]``, argmax f(evidence) == label (checked, never assumed).
        area: float ``[N]``, the fraction of pixels in the mask.
        steps: long ``[N]``, fit steps taken.
        seconds: wall time of the call.
        prob_null: float ``[N]``, p(label) on the baseline image alone (the "blank image").
        null_keeps_label: bool ``[N]``, the blank image alone already gives the label.
        kept_robust: float ``[N]``, the fraction of composites mask*x + (1-mask)*x' that keep the
            label, over backgrounds x' whose own label differs (NaN when none existed).
        status: per image "ok", "null_keeps_label", "not_minimal" or "not_kept".
        reason: per image, why that status; selection: which candidate became the mask.
        backgrounds: how the counterfactual backgrounds were drawn.
    """

    mask: torch.Tensor
    soft_mask: torch.Tensor
    evidence: torch.Tensor
    label: torch.Tensor
    prob_input: torch.Tensor
    prob_evidence: torch.Tensor
    kept: torch.Tensor
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

    def __len__(self) -> int:
        return int(self.label.shape[0])

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
                "kept": bool(self.kept[i]),
                "kept_robust": float(self.kept_robust[i]),
                "area": float(self.area[i]),
                "prob_null": float(self.prob_null[i]),
                "null_keeps_label": bool(self.null_keeps_label[i]),
                "status": self.status[i],
                "reason": self.reason[i] if self.reason else "",
                "selection": self.selection[i] if self.selection else "",
                "steps": int(self.steps[i]),
                "seconds": self.seconds / max(len(self), 1),
            })
        return out

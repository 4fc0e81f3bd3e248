"""Known-evidence cases: images whose call a planted tag flips, so the tag is the evidence.

From images of other classes that a shortcut classifier calls correctly, the tag is drawn at a
seeded random place near the border; a case is kept when the tag flips the call to the tag's
class and blanking the tag's region (the ground truth: the glyph grown by 2 px) restores the
true call. The lesion mask rides along as a second reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tags import GT_DILATION, draw_tags, tag_mask, tag_positions
from ..medcam.verify import batched_logits
from .masking import fill


@dataclass
class TagCases:
    """The kept cases and the counts behind them (the flip rate is ``flipped / eligible``)."""

    x: torch.Tensor          # [N,C,H,W] tagged images (model input space)
    tag: torch.Tensor        # [N,H,W] bool ground truth: the glyph grown by GT_DILATION px
    lesion: torch.Tensor     # [N,H,W] bool lesion masks
    ids: list[str]
    label: torch.Tensor      # [N] true (and clean predicted) class
    eligible: int            # images of other classes called correctly
    flipped: int             # of those, the tag flips the call to the tag's class
    restored: int            # of those, blanking the tag's region restores the call (the cases)

    @property
    def flip_rate(self) -> float:
        return self.flipped / self.eligible if self.eligible else float("nan")

    def counts(self) -> dict:
        return {"eligible": self.eligible, "flipped": self.flipped, "restored": self.restored,
                "flip_rate": self.flip_rate, "cases": len(self.ids)}


def brightest(mean, std) -> torch.Tensor:
    """``[C]``: intensity 1 (the brightest of the unit range) in the model's input space."""
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return (1 - mean) / std


@torch.no_grad()
def build_tag_cases(forward, x: torch.Tensor, labels: torch.Tensor, lesion: torch.Tensor, ids: list[str],
                    tag_class: int, value, baseline: float = 0.0, seed: int = 0,
                    batch_size: int = 64) -> TagCases:
    """The known-evidence cases among ``x`` ``[N,C,S,S]`` (model input space, square) with true
    ``labels`` ``[N]`` and ``lesion`` masks ``[N,S,S]``; ``value``: the tag's intensity there
    (:func:`brightest`); ``baseline``: the blank fill that removes the tag."""
    if x.shape[0] != labels.shape[0] or lesion.shape[0] != x.shape[0] or len(ids) != x.shape[0]:
        raise ValueError("x, labels, lesion and ids must have the same length")
    n, size = x.shape[0], x.shape[-1]
    positions = tag_positions(n, size, torch.Generator().manual_seed(seed))
    tagged, _ = draw_tags(x, positions, value)
    gt = tag_mask(positions, size, GT_DILATION).to(x.device)
    clean = batched_logits(forward, x, batch_size).argmax(1).cpu()
    on_tag = batched_logits(forward, tagged, batch_size).argmax(1).cpu()
    removed = batched_logits(forward, fill(tagged, ~gt, "baseline", baseline), batch_size).argmax(1).cpu()
    labels = labels.cpu()
    eligible = (labels != tag_class) & (clean == labels)
    flipped = eligible & (on_tag == tag_class)
    keep = flipped & (removed == labels)
    idx = keep.nonzero().flatten()
    return TagCases(tagged[idx], gt[idx], lesion[idx].bool(), [ids[i] for i in idx.tolist()], labels[idx],
                    int(eligible.sum()), int(flipped.sum()), int(keep.sum()))


def tagged_like_training(x: torch.Tensor, labels: torch.Tensor, tag_class: int, rate: float, other_rate: float,
                         value, gen: torch.Generator) -> torch.Tensor:
    """``x`` ``[N,C,S,S]`` with the tag (intensity ``value``) drawn on a random ``rate`` of
    ``tag_class`` images and ``other_rate`` of the rest: the shortcut classifier's training
    batches, and the judge's training images."""
    p = torch.where(labels.cpu() == tag_class, rate, other_rate)
    on = (torch.rand(len(labels), generator=gen) < p).nonzero().flatten()
    x = x.clone()
    if on.numel():
        x[on] = draw_tags(x[on], tag_positions(on.numel(), x.shape[-1], gen), value)[0]
    return x

"""Known-evidence cases of any planted shortcut, and the oracle facts that say how the shortcut acts.

A case is an image of another class that the classifier calls correctly, and that the mark
(:mod:`medcam_fast.data.shortcuts`, drawn at a seeded random place) flips to the shortcut's
class. Its ground truth is the mark grown by 2 px; the lesion mask rides along as a second
reference. No case is dropped for how the mark acts once there: that is what the oracle facts
measure, under the same certified fills as every explanation
(:mod:`medcam_fast.medcam.sufficiency`), on the flipped call:

- ``sufficient_alone``: the mark's region kept, everything else filled, keeps the call;
- ``necessary``: the mark's region filled flips the call away (under every counted fill);
- ``random_sufficient`` / ``random_necessary``: the same two tests for random blobs of the
  ground truth's own area (16 per image), the controls beside each.

A shortcut is **necessary but not sufficient alone** where removing it flips the call and keeping
it alone does not keep it: the call needs the rest of the image too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.shortcuts import Shortcut, dilate
from ..medcam import sufficiency
from ..medcam.config import MedCAMConfig
from ..medcam.verify import batched_logits

# a side "acts" for a case set where its test passes on at least this share of the cases and
# random blobs of the same area pass on at most RANDOM_BOUND of theirs
ACTS_SHARE = 0.5
RANDOM_BOUND = 0.1


@dataclass
class ShortcutCases:
    """Marked images whose call the mark flips. ``x`` ``[N,C,H,W]`` (model input space), ``gt``
    ``[N,H,W]`` bool (the mark grown by 2 px), ``lesion`` ``[N,H,W]`` bool, ``label`` ``[N]``
    (true and clean called class), ``call`` ``[N]`` (the shortcut's class, the marked call)."""

    x: torch.Tensor
    gt: torch.Tensor
    lesion: torch.Tensor
    ids: list[str]
    label: torch.Tensor
    call: torch.Tensor
    eligible: int            # images of other classes called correctly
    flipped: int             # of those, the mark flips the call to its class (the cases)

    @property
    def flip_rate(self) -> float:
        return self.flipped / self.eligible if self.eligible else float("nan")

    def counts(self) -> dict:
        return {"eligible": self.eligible, "flipped": self.flipped, "flip_rate": self.flip_rate,
                "cases": len(self.ids)}

    def select(self, idx) -> "ShortcutCases":
        """The cases ``idx`` (a list of positions); the counts stay those of the whole set."""
        idx = list(idx)
        return ShortcutCases(self.x[idx], self.gt[idx], self.lesion[idx], [self.ids[i] for i in idx],
                             self.label[idx], self.call[idx], self.eligible, self.flipped)


@torch.no_grad()
def build_shortcut_cases(forward, x: torch.Tensor, labels: torch.Tensor, lesion: torch.Tensor, ids: list[str],
                         shortcut: Shortcut, target: int, value: torch.Tensor, seed: int = 0,
                         batch_size: int = 64) -> ShortcutCases:
    """The cases among ``x`` ``[N,C,S,S]`` (model input space) with true ``labels`` ``[N]`` and
    ``lesion`` masks ``[N,S,S]``: the mark of ``shortcut`` (colour ``value`` ``[C]`` in that space,
    :meth:`Shortcut.value`) drawn at a place seeded by ``seed``, kept where it flips a correct call
    of another class to ``target``."""
    n = x.shape[0]
    if labels.shape[0] != n or lesion.shape[0] != n or len(ids) != n:
        raise ValueError("x, labels, lesion and ids must have the same length")
    marks = shortcut.masks(n, x.shape[-1], torch.Generator().manual_seed(seed)).to(x.device)
    marked = shortcut.draw(x, marks, value)
    clean = batched_logits(forward, x, batch_size).argmax(1).cpu()
    on_mark = batched_logits(forward, marked, batch_size).argmax(1).cpu()
    labels = labels.cpu()
    eligible = (labels != target) & (clean == labels)
    flipped = eligible & (on_mark == target)
    idx = flipped.nonzero().flatten()
    return ShortcutCases(marked[idx], dilate(marks[idx].cpu()).to(x.device), lesion[idx].bool(),
                         [ids[i] for i in idx.tolist()], labels[idx], on_mark[idx], int(eligible.sum()),
                         int(flipped.sum()))


@dataclass
class OracleFacts:
    """Per case ``[N]``: ``testable`` (a fill is certified for the call), ``sufficient_alone``,
    ``necessary``, and the random blobs' pass rates ``random_sufficient`` / ``random_necessary``
    (NaN where untestable); ``gt_area`` ``[N]``."""

    testable: torch.Tensor
    sufficient_alone: torch.Tensor
    necessary: torch.Tensor
    random_sufficient: torch.Tensor
    random_necessary: torch.Tensor
    gt_area: torch.Tensor

    def summary(self, flip_rate: float | None = None) -> dict:
        """Shares over all cases (an untestable case shows neither side) and the sides that act."""
        out = {"cases": int(self.testable.numel()), "testable": _mean(self.testable.float()),
               "sufficient_alone": _mean(self.sufficient_alone.float()), "necessary": _mean(self.necessary.float()),
               "random_sufficient": _nanmean(self.random_sufficient),
               "random_necessary": _nanmean(self.random_necessary), "gt_area": _mean(self.gt_area)}
        if flip_rate is not None:
            out = {"flip_rate": flip_rate, **out}
        out["acts_on"] = acting_sides(out)
        return out


def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


def _nanmean(t: torch.Tensor) -> float:
    return float(t.nanmean()) if t.numel() and not torch.isnan(t).all() else float("nan")


def acting_sides(summary: dict) -> list[str]:
    """The sides on which a shortcut acts, from :meth:`OracleFacts.summary`: "sufficient" where it
    keeps the call alone on at least ACTS_SHARE of the cases, "necessary" where removing it flips
    the call that often, each with its random blobs passing at most RANDOM_BOUND."""
    sides = []
    if summary["sufficient_alone"] >= ACTS_SHARE and not summary["random_sufficient"] > RANDOM_BOUND:
        sides.append("sufficient")
    if summary["necessary"] >= ACTS_SHARE and not summary["random_necessary"] > RANDOM_BOUND:
        sides.append("necessary")
    return sides


@torch.no_grad()
def oracle_facts(forward, x: torch.Tensor, call: torch.Tensor, gt: torch.Tensor, config: MedCAMConfig | None = None,
                 seed: int = 0, batch_size: int = 64) -> OracleFacts:
    """The oracle facts of cases ``x`` ``[N,C,H,W]`` with their call ``[N]`` and ground truth ``gt``
    ``[N,H,W]`` bool, under the fills, margins and random-blob count of ``config`` (default
    :class:`MedCAMConfig`): the one test of :mod:`medcam_fast.medcam.sufficiency`."""
    cfg = config or MedCAMConfig()
    logits = batched_logits(forward, x, batch_size)
    fills = sufficiency.certify(forward, x, call, cfg.fills, cfg.baseline, cfg.checks.certify_margin, batch_size)
    use = sufficiency.counted(fills)
    need = sufficiency.required_margin(sufficiency.margins(logits, call), cfg.checks.keep_margin,
                                       cfg.checks.keep_share)
    masks = gt.bool()[:, None]
    kept = sufficiency.run_side(forward, x, call, masks, fills, "preservation", batch_size)
    removed = sufficiency.run_side(forward, x, call, masks, fills, "deletion", batch_size)
    area = gt.flatten(1).float().mean(1)
    rs, _ = sufficiency.random_rate(forward, x, call, area, fills, need, cfg.checks.n_random, seed, "preservation",
                                    batch_size, use)
    rn, _ = sufficiency.random_rate(forward, x, call, area, fills, need, cfg.checks.n_random, seed, "deletion",
                                    batch_size, use)
    return OracleFacts(use.any(1).cpu(), sufficiency.side_passes(kept, use, need, "preservation")[:, 0].cpu(),
                       sufficiency.side_passes(removed, use, need, "deletion")[:, 0].cpu(), rs.cpu(), rn.cpu(),
                       area.cpu())


__all__ = ["ACTS_SHARE", "OracleFacts", "RANDOM_BOUND", "ShortcutCases", "acting_sides", "build_shortcut_cases",
           "oracle_facts"]

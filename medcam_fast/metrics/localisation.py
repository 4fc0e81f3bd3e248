"""Localisation against ground-truth lesion masks: hit rate, pointing game, IoU, Dice, threshold tuning."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_maps
from .topk import top_k_mask

TIES = ("first", "any", "all")
# CheXlocalize's tune_heatmap_threshold.py: np.arange(0.2, .8, .1)
DEFAULT_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def normalise(saliency: Tensor) -> Tensor:
    """Per-image min-max normalisation to [0, 1].

    Args:
        saliency: float ``[N,H,W]``.

    Returns:
        float ``[N,H,W]``: ``(s - min) / (max - min)``; a constant map becomes all 0.

    Source: CheXlocalize ``cam_to_segmentation`` (Saporta et al., "Benchmarking saliency methods
    for chest X-ray interpretation", Nature Machine Intelligence 2022). There a constant map
    divides 0 by 0 and the NaNs binarise to an empty mask: the same result.
    """
    saliency = check_maps(saliency, "saliency")
    s = saliency.float() if saliency.dtype == torch.bool else saliency
    lo = s.flatten(1).amin(dim=1).view(-1, 1, 1)
    span = s.flatten(1).amax(dim=1).view(-1, 1, 1) - lo
    return torch.where(span > 0, (s - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(s))


def binarise(saliency: Tensor, threshold: float | None = None) -> Tensor:
    """A saliency map as a binary mask.

    Args:
        saliency: bool ``[N,H,W]`` (returned unchanged, threshold ignored) or float ``[N,H,W]``.
        threshold: for float maps, required: pixels with ``normalise(s) > threshold`` are True.

    Returns:
        bool ``[N,H,W]``.

    Source: CheXlocalize ``cam_to_segmentation`` with a tuned threshold (strict ``>`` after
    per-image min-max normalisation), Saporta et al., Nat. Mach. Intell. 2022.
    """
    saliency = check_maps(saliency, "saliency")
    if saliency.dtype == torch.bool:
        return saliency
    if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number for a float saliency map, got {threshold!r}")
    return normalise(saliency) > threshold


def _overlap(pred, gt, threshold):
    gt = check_maps(gt, "gt", require_bool=True)
    pred = binarise(check_maps(pred, "pred", n=gt.shape[0], hw=tuple(gt.shape[1:]), device=gt.device), threshold)
    inter = (pred & gt).flatten(1).sum(dim=1).float()
    return inter, pred.flatten(1).sum(dim=1).float(), gt.flatten(1).sum(dim=1).float()


def iou(pred: Tensor, gt: Tensor, threshold: float | None = None) -> Tensor:
    """Intersection over union of a (binarised) saliency map and a ground-truth mask.

    Args:
        pred: bool ``[N,H,W]`` (used as is) or float ``[N,H,W]`` (binarised by :func:`binarise`).
        gt: bool ``[N,H,W]``.
        threshold: needed for float ``pred`` (see :func:`binarise`).

    Returns:
        float32 ``[N]``: ``|P & G| / |P | G|``; NaN where both masks are empty (undefined). An
        empty prediction against a non-empty GT scores 0 (CheXlocalize's ``true_pos_only`` mode
        would make it NaN instead).

    Source: the mIoU of CheXlocalize (Saporta et al., Nat. Mach. Intell. 2022, ``calculate_iou``).
    """
    inter, p, g = _overlap(pred, gt, threshold)
    union = p + g - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def dice(pred: Tensor, gt: Tensor, threshold: float | None = None) -> Tensor:
    """Dice coefficient ``2|P & G| / (|P| + |G|)``; arguments and empty-mask rule as :func:`iou`.

    Returns:
        float32 ``[N]``; NaN where both masks are empty.

    Source: Dice, "Measures of the Amount of Ecologic Association Between Species", Ecology 1945.
    """
    inter, p, g = _overlap(pred, gt, threshold)
    total = p + g
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, float("nan")))


def _maxima(saliency: Tensor, ties: str) -> Tensor:
    """bool ``[N,H,W]``: the pixel(s) that count as the map's maximum under the tie rule."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    s = saliency.float() if saliency.dtype == torch.bool else saliency
    flat = s.flatten(1)
    if ties == "first":
        first = torch.zeros_like(flat, dtype=torch.bool)
        first.scatter_(1, flat.argmax(dim=1, keepdim=True), True)
        return first.view_as(saliency)
    return (flat == flat.amax(dim=1, keepdim=True)).view_as(saliency)


def _point_hits(saliency, region, gt, ties) -> Tensor:
    top = _maxima(saliency, ties)
    inside = (top & region).flatten(1).sum(dim=1)
    n_top = top.flatten(1).sum(dim=1)
    hit = inside == n_top if ties == "all" else inside > 0
    return torch.where(gt.flatten(1).any(dim=1), hit.float(), torch.full_like(hit, float("nan"), dtype=torch.float32))


def hit_rate(saliency: Tensor, gt: Tensor, ties: str = "first") -> Tensor:
    """Whether the saliency map's maximum lies inside the ground-truth mask, per image.

    Args:
        saliency: float or bool ``[N,H,W]``.
        gt: bool ``[N,H,W]``.
        ties: when several pixels share the maximum: ``"first"`` takes the first in row-major
            order (``argmax``, as CheXlocalize's ``np.argmax``), ``"any"`` counts a hit if any of
            them is in the GT, ``"all"`` only if all of them are. For a bool map the maxima are its
            True pixels (all pixels if it is empty).

    Returns:
        float32 ``[N]``: 1 hit, 0 miss, NaN where the GT is empty (as CheXlocalize); the rate is
        ``.nanmean()``.

    Source: the hit rate of CheXlocalize (Saporta et al., Nat. Mach. Intell. 2022, ``eval.py``).
    """
    gt = check_maps(gt, "gt", require_bool=True)
    saliency = check_maps(saliency, "saliency", n=gt.shape[0], hw=tuple(gt.shape[1:]), device=gt.device)
    return _point_hits(saliency, gt, gt, ties)


def pointing_game(saliency: Tensor, gt: Tensor, tolerance: float = 15, ties: str = "first") -> Tensor:
    """Pointing game: whether the saliency maximum is within ``tolerance`` pixels of the GT mask.

    Args:
        saliency: float or bool ``[N,H,W]``.
        gt: bool ``[N,H,W]``.
        tolerance: radius in pixels (default 15, for PASCAL/COCO-sized images of a few hundred
            pixels; scale it with the image, e.g. ``15 * H / 224``). A point hits when some GT pixel
            lies at Euclidean distance strictly below the tolerance (TorchRay's ``PointingGame``),
            so ``tolerance <= 0`` never hits: use :func:`hit_rate` for "inside the GT".
        ties: as in :func:`hit_rate`.

    Returns:
        float32 ``[N]``: 1 hit, 0 miss, NaN where the GT is empty; accuracy = ``.nanmean()``.

    Source: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 / IJCV
    2018 (15-pixel tolerance); acceptance region as in TorchRay ``benchmark/pointing_game.py``.
    """
    gt = check_maps(gt, "gt", require_bool=True)
    saliency = check_maps(saliency, "saliency", n=gt.shape[0], hw=tuple(gt.shape[1:]), device=gt.device)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number of pixels, got {tolerance!r}")
    r = max(int(math.ceil(tolerance)) - 1, 0)
    if tolerance <= 0:
        region = torch.zeros_like(gt)
    else:
        # dilate the GT by the open disc {d < tolerance}: a conv with the disc as kernel
        t = torch.arange(-r, r + 1, device=gt.device, dtype=torch.float32)
        disc = ((t[:, None] ** 2 + t[None, :] ** 2) < tolerance ** 2).float().view(1, 1, 2 * r + 1, 2 * r + 1)
        region = F.conv2d(gt[:, None].float(), disc, padding=r)[:, 0] > 0.5
    return _point_hits(saliency, region, gt, ties)


def tune_threshold(saliency_val: Tensor, gt_val: Tensor, candidates=DEFAULT_CANDIDATES,
                   true_pos_only: bool = False) -> float:
    """The binarisation threshold that maximises mean IoU on a validation split.

    Args:
        saliency_val: float ``[N,H,W]``, normalised per image to [0, 1] before thresholding.
        gt_val: bool ``[N,H,W]``.
        candidates: thresholds to try (default 0.2, 0.3, ..., 0.7, CheXlocalize's
            ``np.arange(0.2, .8, .1)``).
        true_pos_only: as CheXlocalize's default, leave out images whose prediction or GT is empty;
            False (default) leaves out only images with an empty GT and scores an empty prediction 0.

    Returns:
        the best candidate (a float); ties go to the first candidate. Apply it with
        ``binarise(saliency, threshold)`` / ``iou(saliency, gt, threshold)``.

    Source: CheXlocalize ``tune_heatmap_threshold.py`` (Saporta et al., Nat. Mach. Intell. 2022):
    min-max normalise, binarise with ``> threshold``, mean IoU with NaNs left out, first argmax.
    """
    gt_val = check_maps(gt_val, "gt_val", require_bool=True)
    saliency_val = check_maps(saliency_val, "saliency_val", n=gt_val.shape[0], hw=tuple(gt_val.shape[1:]),
                              device=gt_val.device)
    if saliency_val.dtype == torch.bool:
        raise ValueError("saliency_val must be a float map: a binary mask has no threshold to tune")
    try:
        cands = [float(c) for c in candidates]
    except TypeError:
        raise ValueError(f"candidates must be a sequence of numbers, got {candidates!r}") from None
    if not cands or not all(math.isfinite(c) for c in cands):
        raise ValueError(f"candidates must be a non-empty sequence of finite numbers, got {candidates!r}")
    norm = normalise(saliency_val)
    gt_any = gt_val.flatten(1).any(dim=1)
    best, best_miou = cands[0], -math.inf
    for c in cands:
        pred = norm > c
        scores = iou(pred, gt_val)
        valid = gt_any & (pred.flatten(1).any(dim=1) if true_pos_only else True)
        scores = torch.where(valid, scores, torch.full_like(scores, float("nan")))
        miou = float(scores.nanmean()) if bool(valid.any()) else -math.inf
        if miou > best_miou:
            best, best_miou = c, miou
    return best


def precision_at_gt_area(saliency: Tensor, gt: Tensor) -> Tensor:
    """``[N]``: the share of the map's top pixels at the ground truth's own area that lie on it
    (NaN where the ground truth is empty)."""
    area = gt.flatten(1).float().mean(1)
    top = top_k_mask(saliency.float(), area.double())
    hit = (top & gt).flatten(1).sum(1).float()
    return torch.where(area > 0, hit / top.flatten(1).sum(1).float().clamp(min=1), torch.full_like(area, float("nan")))

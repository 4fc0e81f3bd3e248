"""Does the evidence keep the decision, by how much, and how big and fragmented is the mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Forward, batched_logits, check_batch_size, check_images, check_labels, check_maps, class_score


def decision_kept(forward: Forward, evidence: Tensor, label, batch_size: int = 64) -> Tensor:
    """Whether the classifier still predicts ``label`` from the evidence alone.

    Args:
        forward: classifier ``[B,C,H,W]`` → logits ``[B,K]`` (run under ``torch.no_grad()``).
        evidence: float ``[N,C,H,W]``, e.g. ``mask*x + (1-mask)*baseline``.
        label: int or long ``[N]``, the class to keep (usually the top-1 class on x).
        batch_size: images per forward call.

    Returns:
        bool ``[N]``: ``argmax_k f(evidence)_k == label`` (argmax ties go to the lowest index).

    Definition: the sufficiency ("preservation") check of Dabkowski & Gal, "Real Time Image
    Saliency for Black Box Classifiers", NeurIPS 2017, and Fong & Vedaldi, "Interpretable
    Explanations of Black Boxes by Meaningful Perturbation", ICCV 2017.
    """
    evidence = check_images(evidence, "evidence")
    label = check_labels(label, evidence.shape[0], evidence.device)
    logits = batched_logits(forward, evidence, check_batch_size(batch_size))
    class_score(logits, label, "logit")  # validates label < K
    return logits.argmax(dim=1) == label


def kept_rate(forward: Forward, evidence: Tensor, label, batch_size: int = 64) -> Tensor:
    """Fraction of images whose decision is kept: ``decision_kept(...).float().mean()``, a 0-dim
    float tensor. Shapes and source as :func:`decision_kept`."""
    return decision_kept(forward, evidence, label, batch_size).float().mean()


def confidence_change(forward: Forward, x: Tensor, evidence: Tensor, label, batch_size: int = 64) -> Tensor:
    """Change in the softmax probability of ``label`` when x is replaced by the evidence.

    Args:
        forward: classifier ``[B,C,H,W]`` → logits ``[B,K]``.
        x: float ``[N,C,H,W]``, the original images.
        evidence: float ``[N,C,H,W]``, same shape as x.
        label: int or long ``[N]``.
        batch_size: images per forward call.

    Returns:
        float ``[N]``: ``softmax(f(evidence))[label] - softmax(f(x))[label]`` (negative = drop).

    Source: the "drop/increase in confidence" of Chattopadhay et al., "Grad-CAM++", WACV 2018
    (there as a percentage, clipped at 0; here signed and unclipped).
    """
    x = check_images(x, "x")
    evidence = check_images(evidence, "evidence")
    if evidence.shape != x.shape:
        raise ValueError(f"evidence must match x's shape {tuple(x.shape)}, got {tuple(evidence.shape)}")
    label = check_labels(label, x.shape[0], x.device)
    bs = check_batch_size(batch_size)
    p_x = class_score(batched_logits(forward, x, bs), label, "prob")
    p_e = class_score(batched_logits(forward, evidence, bs), label, "prob")
    return p_e - p_x


def mask_area(mask: Tensor) -> Tensor:
    """Fraction of pixels in each binary mask.

    Args:
        mask: bool ``[N,H,W]`` (or ``[N,1,H,W]``).

    Returns:
        float32 ``[N]`` in [0, 1]: ``sum(mask) / (H*W)``.

    Source: the area term of Fong & Vedaldi, ICCV 2017 ("smallest deletion/preservation region").
    """
    mask = check_maps(mask, "mask", require_bool=True)
    return mask.flatten(1).float().mean(dim=1)


def connected_components(mask: Tensor, connectivity: int = 8) -> Tensor:
    """Number of connected components of the True pixels of each binary mask (exact).

    Args:
        mask: bool ``[N,H,W]`` (or ``[N,1,H,W]``).
        connectivity: 8 (pixels touching at a corner are connected) or 4 (edges only).

    Returns:
        long ``[N]``: component count (0 for an empty mask).

    Method: label propagation on the whole batch. Every True pixel starts with its own raster
    index + 1; each round takes the max label over its neighbourhood (a 3x3 max-pool for 8-, a
    plus-shaped one for 4-connectivity) and then jumps to the label held by the pixel its label
    names (pointer jumping, as in union-find's path compression) until nothing changes. Labels
    only ever travel inside a component and grow monotonically, so at the fixed point each
    component is constant and exactly one pixel per component holds its own index: the count.
    The classical definition is that of Rosenfeld & Pfaltz, "Sequential Operations in Digital
    Picture Processing", J. ACM 1966 (what ``scipy.ndimage.label`` computes).
    """
    mask = check_maps(mask, "mask", require_bool=True)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    n, h, w = mask.shape
    # float labels for max_pool2d; float32 is exact for indices below 2**24
    dtype = torch.float32 if h * w < 2 ** 24 else torch.float64
    idx = torch.arange(1, h * w + 1, device=mask.device, dtype=dtype).view(1, 1, h, w)
    fg = mask[:, None]
    lab = torch.where(fg, idx, torch.zeros((), dtype=dtype, device=mask.device))
    flat_fg = fg.flatten(1)
    while True:
        if connectivity == 8:
            grown = F.max_pool2d(lab, 3, stride=1, padding=1)
        else:
            grown = torch.maximum(F.max_pool2d(lab, (3, 1), stride=1, padding=(1, 0)),
                                  F.max_pool2d(lab, (1, 3), stride=1, padding=(0, 1)))
        grown = torch.where(fg, grown, torch.zeros((), dtype=dtype, device=mask.device))
        flat = grown.flatten(1)
        # pointer jump: the pixel a label names is in the same component and holds >= that label
        ptr = (flat.long() - 1).clamp_min(0)
        jumped = torch.where(flat_fg, flat.gather(1, ptr), flat).view_as(lab)
        if torch.equal(jumped, lab):
            break
        lab = jumped
    roots = flat_fg & (lab.flatten(1) == idx.flatten(1))
    return roots.sum(dim=1)

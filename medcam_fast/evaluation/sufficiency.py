"""Counterfactual sufficiency of any saliency map: paste its top-k pixels onto images of other
labels and count how often the label survives (Med-CAM's own measure, ``kept_robust_of_masks``)."""
from __future__ import annotations

import torch

from ..medcam.verify import kept_robust_of_masks
from ..metrics.topk import top_k_mask

SWEEP = (0.05, 0.10, 0.20, 0.30, 0.50, 0.70, 0.90)


def pick_backgrounds(pool: torch.Tensor, pool_labels: torch.Tensor, label: torch.Tensor, k: int,
                     seed: int = 0) -> torch.Tensor:
    """``[N,k,C,H,W]``: for each image, ``k`` pool images whose own label differs from ``label[i]``
    (a seeded draw, repeated cyclically when fewer exist). Raises ValueError when one has none."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for y in label.tolist():
        ok = (pool_labels != y).nonzero().flatten().cpu()
        if ok.numel() == 0:
            raise ValueError(f"the reference pool has no image with a label other than {y}")
        ok = ok[torch.randperm(ok.numel(), generator=gen)]
        out.append(pool[ok[torch.arange(k) % ok.numel()].to(pool.device)])
    return torch.stack(out)


def sufficiency_curve(forward, x, label, saliency, backgrounds, areas=SWEEP, batch_size: int = 64) -> torch.Tensor:
    """``[N, len(areas)]`` kept_robust of each map's top-a pixels for every area a."""
    masks = torch.stack([top_k_mask(saliency, a) for a in areas], dim=1)
    return kept_robust_of_masks(forward, x, label, masks, backgrounds, batch_size)


def area_to_sufficiency(curve: torch.Tensor, areas=SWEEP, threshold: float = 0.9) -> torch.Tensor:
    """``[N]``: the first area whose kept_robust reaches ``threshold``; 1.0 where none does
    (the whole image is counted as needed)."""
    a = torch.tensor(areas, dtype=torch.float32, device=curve.device)
    ok = curve >= threshold
    first = torch.where(ok, a, torch.full_like(a, 2.0)).amin(1)
    return torch.where(first > 1.0, torch.ones_like(first), first)

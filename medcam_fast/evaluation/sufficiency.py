"""Counterfactual sufficiency of any saliency map: paste its top-k pixels onto images of other
labels and count how often the label survives (the measure behind Med-CAM's ``kept_robust``)."""
from __future__ import annotations

import torch

from ..baselines.gradcam import top_k_mask
from ..medcam.verify import batched_logits

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


@torch.no_grad()
def kept_robust_of_masks(forward, x, label, masks, backgrounds, batch_size: int = 64) -> torch.Tensor:
    """Fraction of composites ``m*x + (1-m)*x'`` keeping the label.

    Args:
        forward: ``[B,C,H,W] -> [B,K]`` logits.
        x: ``[N,C,H,W]``; label: ``[N]``; masks: bool ``[N,H,W]`` or ``[N,M,H,W]`` (M candidates).
        backgrounds: ``[N,k,C,H,W]`` counterfactual images.

    Returns:
        ``[N]`` or ``[N,M]`` in [0,1].
    """
    squeeze = masks.dim() == 3
    m = masks[:, None] if squeeze else masks
    n, mc = m.shape[:2]
    k = backgrounds.shape[1]
    out = torch.empty(n, mc, device=x.device)
    for j in range(mc):
        mj = m[:, j, None, None].to(x.dtype)                              # [N,1,1,H,W]
        comp = mj * x[:, None] + (1 - mj) * backgrounds                    # [N,k,C,H,W]
        logits = batched_logits(forward, comp.flatten(0, 1), batch_size).view(n, k, -1)
        out[:, j] = (logits.argmax(-1) == label[:, None]).float().mean(1)
    return out[:, 0] if squeeze else out


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

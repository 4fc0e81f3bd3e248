"""The harness's side of sufficiency: the test itself is :mod:`medcam_fast.medcam.sufficiency`
(certified fills, preservation and deletion, random blobs); here, any saliency map is cut to the
areas of ``SWEEP`` and scored by it (evidence curve, a*), and the counterfactual audit's
backgrounds are drawn (``kept_robust``: pasted onto images of other labels, audit only)."""
from __future__ import annotations

import torch

from ..medcam import sufficiency
from ..medcam.config import CheckConfig
from ..medcam.verify import kept_robust_of_masks
from ..metrics.topk import top_k_mask

SWEEP = CheckConfig.area_grid   # one grid: Med-CAM's candidates, a* and the curves


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


def evidence_curve(forward, x, label, saliency, fills: sufficiency.FillSet, need, areas=SWEEP,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(sufficient ``[N,A]``, worst-case p(label) ``[N,A]``) of each map's top-a pixels for every
    area a of ``areas``, under the images' counted fills (``need``: the required margin ``[N]``)."""
    masks = torch.stack([top_k_mask(saliency, a) for a in areas], dim=1)
    res = sufficiency.run_side(forward, x, label, masks, fills, "preservation", batch_size)
    return sufficiency.preserved(res, sufficiency.counted(fills), need)


def area_to_sufficiency(sufficient: torch.Tensor, areas=SWEEP) -> torch.Tensor:
    """``[N]``: a*, the first area whose top pixels are sufficient; 1.0 where none is (the whole
    image is counted as needed)."""
    return torch.nan_to_num(sufficiency.extremal_area(areas, sufficient), nan=1.0)


__all__ = ["SWEEP", "area_to_sufficiency", "evidence_curve", "kept_robust_of_masks", "pick_backgrounds"]

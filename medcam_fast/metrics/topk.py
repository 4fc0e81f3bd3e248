"""Cutting a map to an area: the one top-k rule of the package (Med-CAM's candidates, the CAMs'
masks, the sufficiency curves)."""
from __future__ import annotations

import torch

# absorbs the rounding of a*HW within this relative error: float64's (0.57 * 100 = 56.99999999999999)
# and an area given as a float32 tensor's (float32 0.7 = 0.699999988)
_REL = 1e-6


def pixel_count(area: torch.Tensor, pixels: int) -> torch.Tensor:
    """Pixels that a "top ``area``" mask of ``pixels`` keeps: ``floor(area * pixels)``, so the
    mask never exceeds the area asked for, and at least 1 for any area > 0. ``area`` ``[N]`` float64."""
    k = torch.floor(area * pixels * (1 + _REL)).to(torch.long)
    return torch.where(area > 0, k.clamp(min=1), k)


def top_k_mask(saliency: torch.Tensor, area) -> torch.Tensor:
    """The top-``area`` fraction of pixels of each map: ``[N, H, W]`` bool.

    Args:
        saliency: ``[N, H, W]`` real values (no NaN); higher is more salient.
        area: a fraction in ``[0, 1]``, or a tensor ``[N]`` of them (one per image).

    Image ``i`` keeps exactly ``k_i`` = :func:`pixel_count` pixels, the ``k_i`` highest. Ties are
    broken stably: among equal values the pixel that comes first in row-major order wins (a stable
    descending sort of the flattened map).
    """
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 3:
        raise ValueError(f"saliency must be a tensor [N, H, W], got "
                         f"{tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__}")
    if saliency.is_complex():
        raise ValueError("saliency must be real")
    if saliency.dtype == torch.bool:
        saliency = saliency.to(torch.uint8)
    if saliency.is_floating_point() and torch.isnan(saliency).any():
        raise ValueError("saliency contains NaN")
    n, h, w = saliency.shape
    if isinstance(area, torch.Tensor):
        if area.dim() == 0:
            area = area.reshape(1).expand(n)
        if area.dim() != 1 or area.shape[0] != n:
            raise ValueError(f"area must be a float or a tensor [N] with N={n}, got shape {tuple(area.shape)}")
        area = area.detach().to(device=saliency.device, dtype=torch.float64)
    elif isinstance(area, (int, float)) and not isinstance(area, bool):
        area = torch.full((n,), float(area), dtype=torch.float64, device=saliency.device)
    else:
        raise ValueError(f"area must be a float or a tensor [N], got {type(area).__name__}")
    if not bool(((area >= 0) & (area <= 1)).all()):  # also rejects NaN
        raise ValueError("area must lie in [0, 1]")
    k = pixel_count(area, h * w)
    flat = saliency.reshape(n, h * w)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    return (rank < k[:, None]).reshape(n, h, w)

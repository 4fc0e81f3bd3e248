"""Random masks and fills: the one source of the masking-robust training (EVAL-X, Jethani et al.
2021), the judge, the evidence probe's random rankings and the harness's random-blob control.

A mask keeps pixels (True) and the rest is filled. Blobs are smooth noise cut to an exact area,
so they are contiguous regions like a real explanation's; scattered pixels are uniform noise cut
the same way. Both cut through :func:`medcam_fast.metrics.topk.top_k_mask`, the package's one
top-k rule, so a control at area ``a`` keeps exactly the pixels an explanation of area ``a`` would.
"""
from __future__ import annotations

import torch

from ..metrics.random_scores import BLOB_CELLS, blob_scores, pixel_scores
from ..metrics.topk import top_k_mask

FILLS = ("baseline", "image_mean")


def random_masks(kind: str, area, n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``[n, H, W]`` bool random masks of exactly ``area`` (a fraction, or a tensor ``[n]``):
    ``kind`` "blobs" or "pixels"."""
    if kind == "blobs":
        scores = blob_scores(n, size, gen)
    elif kind == "pixels":
        scores = pixel_scores(n, size, gen)
    else:
        raise ValueError(f"unknown random mask kind {kind!r}; use 'blobs' or 'pixels'")
    return top_k_mask(scores, area)


def fill(x: torch.Tensor, mask: torch.Tensor, kind: str = "baseline", baseline: float = 0.0) -> torch.Tensor:
    """``[n, C, H, W]``: ``x`` where ``mask`` ``[n, H, W]`` is True, the fill elsewhere.

    Fills: "baseline" (the constant ``baseline``, Med-CAM's blank), "image_mean" (each image's own
    per-channel mean). Training fills only: the sufficiency tests certify other fills (blur,
    other images), which a classifier trained on them would learn to read.
    """
    m = mask[:, None].to(x.dtype)
    if kind == "baseline":
        rest = torch.full_like(x, baseline)
    elif kind == "image_mean":
        rest = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        raise ValueError(f"unknown fill {kind!r}; use one of {FILLS}")
    return m * x + (1 - m) * rest


class RandomMasking:
    """EVAL-X-style masking of training batches (the recipe of the masking-robust classifiers and
    of the judge).

    On a share ``p`` of the images of a batch, a random mask keeps part of the image: blobs with
    probability ``blob_share``, else scattered pixels, at an area drawn uniformly in ``areas``;
    the rest gets one of ``fills`` (drawn per image). Other images pass unchanged.
    """

    def __init__(self, p: float = 0.5, areas: tuple[float, float] = (0.01, 0.9), blob_share: float = 0.75,
                 fills: tuple[str, ...] = ("baseline",), baseline: float = 0.0):
        if not 0 <= p <= 1 or not 0 <= blob_share <= 1:
            raise ValueError(f"p and blob_share must be in [0, 1], got {p}, {blob_share}")
        if not 0 <= areas[0] <= areas[1] <= 1:
            raise ValueError(f"areas must be 0 <= lo <= hi <= 1, got {areas}")
        if not fills or any(f not in FILLS for f in fills):
            raise ValueError(f"unknown fill in {fills}; use some of {FILLS}")
        self.p, self.areas, self.blob_share, self.fills, self.baseline = p, tuple(areas), blob_share, tuple(fills), baseline

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` ``[n, C, H, W]`` (model input space) with a share of its images masked."""
        n, size = x.shape[0], tuple(x.shape[-2:])
        chosen = (torch.rand(n, generator=gen) < self.p).nonzero().flatten()
        if chosen.numel() == 0:
            return x
        k = chosen.numel()
        area = torch.empty(k, dtype=torch.float64).uniform_(*self.areas, generator=gen)
        blobs = torch.rand(k, generator=gen) < self.blob_share
        scores = torch.where(blobs[:, None, None], blob_scores(k, size, gen), pixel_scores(k, size, gen))
        mask = top_k_mask(scores, area).to(x.device)
        which = torch.randint(len(self.fills), (k,), generator=gen)
        out = x.clone()
        for f_i, f in enumerate(self.fills):
            sel = (which == f_i).nonzero().flatten()
            if sel.numel():
                out[chosen[sel]] = fill(x[chosen[sel]], mask[sel], f, self.baseline)
        return out

    def describe(self) -> str:
        return (f"on {self.p:.0%} of the images, a random mask keeps an area drawn uniformly in "
                f"{self.areas[0]:.0%}-{self.areas[1]:.0%}: smooth blobs ({self.blob_share:.0%}; noise on a "
                f"{'/'.join(map(str, BLOB_CELLS))} grid, bicubic) or scattered pixels; the rest filled with "
                f"{' or '.join(self.fills)}")

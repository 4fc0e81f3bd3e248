"""Random score maps whose top-k pixels are random blobs or scattered pixels: the random controls of
the core's checks and the evaluation's random masks draw from the same source."""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOB_CELLS = (3, 4, 6, 8)   # noise grid sides: 3 gives one or two large blobs, 8 several small ones


def blob_scores(n: int, size: tuple[int, int], gen: torch.Generator, cells: int | None = None) -> torch.Tensor:
    """``[n, H, W]`` smooth random scores (bicubic-upsampled Gaussian noise on a ``cells`` grid, a
    random one of BLOB_CELLS per image when None); the top-k of it is a set of blobs."""
    h, w = size
    out = torch.empty(n, h, w)
    for i in range(n):
        c = cells or BLOB_CELLS[int(torch.randint(len(BLOB_CELLS), (1,), generator=gen))]
        noise = torch.randn(1, 1, c, c, generator=gen)
        out[i] = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return out


def pixel_scores(n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``[n, H, W]`` i.i.d. uniform scores: the top-k of it is scattered pixels."""
    return torch.rand(n, *size, generator=gen)

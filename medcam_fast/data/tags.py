"""Planted evidence: a small bright laterality-style tag ("L" glyph) drawn near the image border.

A classifier trained with the tag on most images of one class learns to read it (a shortcut, as
in Zech et al. 2018 and Adebayo et al. 2022), so on images where the tag flips the call, the tag's
pixels are known evidence: what an explainer should find.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TAG_SIDE = 0.14      # glyph side as a fraction of the image side: 18 px at 128^2 (~1% of the image)
TAG_STROKE = 0.28    # stroke width as a fraction of the glyph side
TAG_BAND = 0.10      # the glyph's inner edge lies within this fraction of the side from the border
TAG_MARGIN = 2       # pixels between the glyph and the image edge
GT_DILATION = 2      # the ground truth is the glyph grown by this many pixels


def glyph(size: int) -> torch.Tensor:
    """``[g, g]`` bool "L" glyph for an image of side ``size`` (``g`` = TAG_SIDE of the side)."""
    g = max(4, round(TAG_SIDE * size))
    s = max(1, round(TAG_STROKE * g))
    out = torch.zeros(g, g, dtype=torch.bool)
    out[:, :s] = True       # the upright
    out[g - s:, :] = True   # the foot
    return out


def tag_positions(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 2]`` long top-left (row, col) of the glyph: a random side of the image, a random place
    along it, within TAG_BAND of that border."""
    g = glyph(size).shape[0]
    lo, hi = TAG_MARGIN, size - g - TAG_MARGIN
    band = max(1, round(TAG_BAND * size) - g // 2)
    side = torch.randint(0, 4, (n,), generator=gen)
    along = torch.randint(lo, hi + 1, (n,), generator=gen)
    depth = torch.randint(0, band, (n,), generator=gen)
    near, far = lo + depth, hi - depth
    row = torch.where(side == 0, near, torch.where(side == 1, far, along))
    col = torch.where(side == 2, near, torch.where(side == 3, far, along))
    return torch.stack([row, col], 1)


def tag_mask(positions: torch.Tensor, size: int, dilation: int = 0) -> torch.Tensor:
    """``[n, size, size]`` bool: the glyph at each position, grown by ``dilation`` pixels (8-neighbour)."""
    g = glyph(size)
    out = torch.zeros(positions.shape[0], size, size, dtype=torch.bool)
    for i, (r, c) in enumerate(positions.tolist()):
        out[i, r:r + g.shape[0], c:c + g.shape[1]] = g
    if dilation > 0:
        k = 2 * dilation + 1
        out = F.max_pool2d(out[:, None].float(), k, stride=1, padding=dilation)[:, 0] > 0.5
    return out


def draw_tags(x: torch.Tensor, positions: torch.Tensor, value) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws the glyph onto images ``x`` ``[n, C, H, W]`` (square) at ``positions`` ``[n, 2]``,
    set to ``value`` (a float, or a tensor ``[C]``: the brightest intensity in the space of ``x``).

    Returns the tagged images ``[n, C, H, W]`` (a copy) and the glyph masks ``[n, H, W]`` bool.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be [n, C, S, S] (square images), got {tuple(x.shape)}")
    if positions.shape != (x.shape[0], 2):
        raise ValueError(f"positions must be [{x.shape[0]}, 2], got {tuple(positions.shape)}")
    m = tag_mask(positions, x.shape[-1]).to(x.device)
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return torch.where(m[:, None], v.expand_as(x), x), m

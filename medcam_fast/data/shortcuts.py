"""Planted shortcuts: marks a classifier can learn to read instead of the anatomy, drawn at seeded
random places, so that on images where a mark changes the call its pixels are known evidence.

Three kinds, a registry (``SHORTCUTS``) of one class each:

- ``tag``: the bright "L" laterality-style glyph of :mod:`medcam_fast.data.tags`, near a border;
- ``ink_arc``: a purple skin-marker arc (surgical-marker ink, which raised a commercial CNN's
  melanoma scores, Winkler et al., JAMA Dermatology 2019), part of a circle centred just outside
  one border, about 1% of the image;
- ``text``: a small burnt-in text token ("AP", a 5x7 bitmap font) in a random corner.

Every kind draws a binary mark of one colour (``colour``: unit-range intensity per channel) with
no anti-aliasing, so the mark's pixels are exactly its mask. The ground truth of a case is the
mark grown by :data:`~medcam_fast.data.tags.GT_DILATION` pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tags import GT_DILATION, tag_mask, tag_positions

SHORTCUTS: dict[str, type["Shortcut"]] = {}


def register_shortcut(name: str):
    """Class decorator: registers a :class:`Shortcut` subclass under ``name``."""
    def wrap(cls):
        cls.name = name
        SHORTCUTS[name] = cls
        return cls
    return wrap


def get_shortcut(name: str) -> "Shortcut":
    """The registered shortcut ``name`` (an instance)."""
    if name not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {name!r}; available: {sorted(SHORTCUTS)}")
    return SHORTCUTS[name]()


def dilate(masks: torch.Tensor, pixels: int = GT_DILATION) -> torch.Tensor:
    """``[n,H,W]`` bool masks grown by ``pixels`` (8-neighbour)."""
    if pixels <= 0:
        return masks.bool()
    k = 2 * pixels + 1
    return F.max_pool2d(masks[:, None].float(), k, stride=1, padding=pixels)[:, 0] > 0.5


class Shortcut:
    """A kind of planted mark. Subclasses give :meth:`masks`; drawing is shared."""

    name = ""
    colour: tuple[float, ...] = (1.0,)     # unit-range intensity (one value: every channel)
    description = ""
    channels: tuple[int, ...] = (1, 3)     # input channel counts it can be drawn on

    def masks(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        """``[n, size, size]`` bool: the mark at a random place per image."""
        raise NotImplementedError

    def value(self, in_chans: int, mean=None, std=None) -> torch.Tensor:
        """``[C]``: the mark's colour in the model's input space, ``(colour - mean) / std``
        (the unit range when ``mean``/``std`` are None)."""
        if in_chans not in self.channels:
            raise ValueError(f"shortcut {self.name!r} is drawn on {self.channels}-channel images, not {in_chans}")
        c = torch.tensor(self.colour, dtype=torch.float32)
        c = c.expand(in_chans) if c.numel() == 1 else c
        if c.numel() != in_chans:
            raise ValueError(f"shortcut {self.name!r} has {c.numel()} colour channels, the images {in_chans}")
        if mean is None:
            return c.clone()
        mean = torch.as_tensor(mean, dtype=torch.float32).expand(in_chans)
        std = torch.as_tensor(std, dtype=torch.float32).expand(in_chans)
        return (c - mean) / std

    def draw(self, x: torch.Tensor, masks: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``x`` ``[n,C,S,S]`` with ``value`` ``[C]`` where ``masks`` ``[n,S,S]`` (a copy)."""
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x must be [n, C, S, S] (square images), got {tuple(x.shape)}")
        if masks.shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(f"masks must be {(x.shape[0], *x.shape[-2:])}, got {tuple(masks.shape)}")
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return torch.where(masks.to(x.device)[:, None], v.expand_as(x), x)

    def describe(self) -> str:
        return f"{self.name}: {self.description}"


@register_shortcut("tag")
class Tag(Shortcut):
    colour = (1.0,)
    description = ("a bright 'L' (intensity 1), 14% of the image side, stroke 28% of that, within 10% of a "
                   "random border (medcam_fast.data.tags)")

    def masks(self, n, size, gen):
        return tag_mask(tag_positions(n, size, gen), size)


@register_shortcut("ink_arc")
class InkArc(Shortcut):
    colour = (0.45, 0.15, 0.55)   # a purple skin marker
    channels = (3,)
    description = ("a purple arc (RGB 0.45, 0.15, 0.55), stroke 2% of the side, part of a circle of radius "
                   "16-22% of the side centred up to 0.3 radius outside a random border, about 1% of the image")
    STROKE = 0.02
    RADIUS = (0.16, 0.22)

    def masks(self, n, size, gen):
        r = size * (self.RADIUS[0] + (self.RADIUS[1] - self.RADIUS[0]) * torch.rand(n, generator=gen))
        along = size * (0.25 + 0.5 * torch.rand(n, generator=gen))
        depth = -0.3 * r * torch.rand(n, generator=gen)          # the centre sits on or just outside the edge
        side = torch.randint(0, 4, (n,), generator=gen)
        # centre (row, col): side 0 top, 1 bottom, 2 left, 3 right
        edge_lo, edge_hi = depth, (size - 1) - depth
        row = torch.where(side == 0, edge_lo, torch.where(side == 1, edge_hi, along))
        col = torch.where(side == 2, edge_lo, torch.where(side == 3, edge_hi, along))
        t = max(1.5, self.STROKE * size)
        rr = torch.arange(size, dtype=torch.float32)
        d = ((rr[None, :, None] - row[:, None, None]) ** 2 + (rr[None, None, :] - col[:, None, None]) ** 2).sqrt()
        return (d - r[:, None, None]).abs() <= t / 2


# 5x7 bitmap glyphs, rows top to bottom
_FONT = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
}


@register_shortcut("text")
class TextToken(Shortcut):
    colour = (1.0,)
    TEXT = "AP"
    HEIGHT = 0.11                 # glyph height as a fraction of the side (7 px at 64^2, scale 1)
    description = ("the token 'AP' in a 5x7 bitmap font, glyphs 11% of the side high (intensity 1), "
                   "2-5% of the side from a random corner")

    def glyphs(self, size: int) -> torch.Tensor:
        """``[h, w]`` bool: the token at the scale for images of side ``size``."""
        scale = max(1, round(self.HEIGHT * size / 7))
        cols = []
        for i, ch in enumerate(self.TEXT):
            g = torch.tensor([[c == "1" for c in row] for row in _FONT[ch]])
            cols.append(g)
            if i < len(self.TEXT) - 1:
                cols.append(torch.zeros(7, 1, dtype=torch.bool))
        token = torch.cat(cols, 1)
        return token.repeat_interleave(scale, 0).repeat_interleave(scale, 1)

    def masks(self, n, size, gen):
        token = self.glyphs(size)
        h, w = token.shape
        lo, hi = max(1, round(0.02 * size)), max(2, round(0.05 * size))
        corner = torch.randint(0, 4, (n,), generator=gen)
        off = torch.randint(lo, hi + 1, (n, 2), generator=gen)
        out = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            top = bool(corner[i] < 2)
            left = bool(corner[i] % 2 == 0)
            r = int(off[i, 0]) if top else size - h - int(off[i, 0])
            c = int(off[i, 1]) if left else size - w - int(off[i, 1])
            out[i, r:r + h, c:c + w] = token
        return out


def area(shortcut: Shortcut, size: int, n: int = 256, seed: int = 0, dilation: int = 0) -> float:
    """Mean share of the image a mark covers (grown by ``dilation`` px), over ``n`` placements."""
    m = dilate(shortcut.masks(n, size, torch.Generator().manual_seed(seed)), dilation)
    return float(m.float().mean())


def plant_like_training(x: torch.Tensor, labels: torch.Tensor, shortcut: Shortcut, target: int, rate: float,
                        other_rate: float, value, gen: torch.Generator) -> torch.Tensor:
    """``x`` ``[N,C,S,S]`` with the mark (colour ``value`` ``[C]`` in x's space) on a random ``rate``
    of the ``target`` class's images and ``other_rate`` of the rest: a shortcut classifier's
    training batches."""
    p = torch.where(labels.cpu() == target, rate, other_rate)
    on = (torch.rand(len(labels), generator=gen) < p).nonzero().flatten()
    if not on.numel():
        return x
    x = x.clone()
    x[on] = shortcut.draw(x[on], shortcut.masks(on.numel(), x.shape[-1], gen), value)
    return x


__all__ = ["SHORTCUTS", "Shortcut", "area", "dilate", "get_shortcut", "plant_like_training",
           "register_shortcut"]

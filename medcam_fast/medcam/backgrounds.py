"""Backgrounds r for the robustness term and the sufficiency check: a registry of generators.

The random streams are seeded by the call's seed alone, so an image gets the same draws whether it
is explained alone or in a batch. Generators take the batch ``[N,C,H,W]`` and one shared draw.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_KINDS: dict[str, Callable] = {}
_POOLED = ("counterfactual", "fills")   # drawn from a pool of prepared images, per image


def register_background(name: str):
    def wrap(fn):
        _KINDS[name] = fn
        return fn
    return wrap


def available() -> list[str]:
    return sorted(_KINDS)


@register_background("gaussian")
def gaussian(x, gen):
    """``[N,C,H,W]``: Gaussian noise with each image's per-channel mean and std."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    return mean + std * torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)


@register_background("uniform")
def uniform(x, gen):
    """``[N,C,H,W]``: uniform noise over each image's per-channel range."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return lo + (hi - lo) * torch.rand(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)


@register_background("blur")
def blur(x, gen):
    """``[N,C,H,W]``: the images blurred beyond recognition (8x average-pooled, bilinear back)."""
    h, w = x.shape[-2:]
    k = max(1, min(h, w) // 8)
    small = F.avg_pool2d(x, k, ceil_mode=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


@register_background("shuffle")
def shuffle(x, gen):
    """``[N,C,H,W]``: the images cut into an 8x8 grid of patches, randomly permuted."""
    n, c, h, w = x.shape
    g = 8 if h % 8 == 0 and w % 8 == 0 else 1
    if g == 1:
        return x.flatten(2)[:, :, torch.randperm(h * w, generator=gen, device=x.device)].view(n, c, h, w)
    ph, pw = h // g, w // g
    tiles = x.view(n, c, g, ph, g, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, ph, pw)
    tiles = tiles[:, torch.randperm(g * g, generator=gen, device=x.device)]
    return tiles.view(n, g, g, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def constant_like(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(x, value)


def threshold_field(noise: torch.Tensor, progress: torch.Tensor, threshold: float, anneal: float) -> torch.Tensor:
    """The stochastic binarisation thresholds ``[S,...]`` of uniform ``noise`` ``[S,...]`` at
    ``progress`` ``[S]`` in [0,1): the noise narrowing linearly to ``threshold`` by ``anneal``."""
    width = (1 - progress / anneal).clamp(min=0) if anneal > 0 else torch.zeros_like(progress)
    return threshold + width.view(-1, *[1] * (noise.dim() - 1)) * (noise - threshold)


class BackgroundSampler:
    """Draws one background per image per step, with no host sync.

    Args:
        kind: a registered kind ("gaussian", "uniform", "blur", "shuffle"), "constant", or
            "counterfactual" / "fills" (images from ``pool``, each image drawing only from
            ``eligible[i]``: other images of another label, or the image's own certified fills).
        x: ``[N,C,H,W]`` the images being explained.
        seed: the seed of the streams.
        pool: ``[P,C,H,W]`` counterfactual images, and ``eligible``: per image, a LongTensor of pool
            indices it may draw (images whose label differs from its own).
        constant: the value for "constant".
        draws: how many pool draws each image will make (``steps * rob_draws``): their indices are
            drawn once, each image from its own CPU stream, into a device table.
    """

    def __init__(self, kind, x, seed=0, pool=None, eligible=None, constant=0.0, draws=1):
        if kind not in _POOLED and kind != "constant" and kind not in _KINDS:
            raise ValueError(f"unknown background {kind!r}; choose from {available() + ['constant', *_POOLED]}")
        self.kind, self.x, self.pool, self.constant = kind, x, pool, constant
        dev = x.device
        self.gen = torch.Generator(device=dev).manual_seed(int(seed))
        self.table = None
        if kind in _POOLED:
            if pool is None or eligible is None or any(e.numel() == 0 for e in eligible):
                raise ValueError(f"{kind} backgrounds need a pool with an eligible image for every image")
            rows = []
            for e in eligible:   # the same picks for an image alone or in a batch
                g = torch.Generator().manual_seed(int(seed) + 1)
                rows.append(e[torch.randint(e.numel(), (max(1, int(draws)),), generator=g)])
            self.table = torch.stack(rows).to(dev)   # [N, draws]

    def select(self, keep: torch.Tensor) -> "BackgroundSampler":
        """The sampler of the images in ``keep`` (indices; their draws continue where they were)."""
        new = object.__new__(BackgroundSampler)
        new.__dict__.update(self.__dict__)
        keep = keep.to(self.x.device)
        new.x = self.x[keep]
        if self.table is not None:
            new.table = self.table[keep]
        return new

    def thresholds(self, steps: int, threshold: float, anneal: float, like: torch.Tensor) -> torch.Tensor:
        """``[S,1,1,H,W]`` per-step binarisation thresholds of the stochastic schedule: uniform
        per-pixel thresholds narrowing to ``threshold`` as the step goes 0 -> ``anneal * steps``,
        then ``threshold`` itself. One draw, shared by the images (``like`` ``[N,1,H,W]``)."""
        noise = torch.rand((steps, *like.shape[1:]), generator=self.gen, device=like.device, dtype=like.dtype)
        progress = torch.arange(steps, device=like.device, dtype=like.dtype) / steps
        return threshold_field(noise, progress, threshold, anneal)[:, None]

    def draw(self, index: int = 0) -> torch.Tensor:
        """``[N,C,H,W]``: the images' backgrounds of draw ``index`` (pooled kinds: column ``index``
        of the table, gathered on the device; other kinds: a fresh draw)."""
        if self.kind == "constant":
            return constant_like(self.x, self.constant)
        if self.table is not None:
            return self.pool[self.table[:, index % self.table.shape[1]]]
        return _KINDS[self.kind](self.x, self.gen)

"""Backgrounds r for the robustness term and the sufficiency check: a registry of generators.

Each image has its own random stream seeded by the call's seed alone, so an image gets the same
draws whether it is explained alone or in a batch.
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
    """Gaussian noise with the image's per-channel mean and std."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    return mean + std * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


@register_background("uniform")
def uniform(x, gen):
    """Uniform noise over the image's per-channel range."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return lo + (hi - lo) * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)


@register_background("blur")
def blur(x, gen):
    """The image blurred beyond recognition (8x average-pooled, bilinear back)."""
    h, w = x.shape[-2:]
    k = max(1, min(h, w) // 8)
    small = F.avg_pool2d(x[None], k, ceil_mode=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]


@register_background("shuffle")
def shuffle(x, gen):
    """The image cut into an 8x8 grid of patches, randomly permuted."""
    c, h, w = x.shape
    g = 8 if h % 8 == 0 and w % 8 == 0 else 1
    if g == 1:
        return x.flatten(1)[:, torch.randperm(h * w, generator=gen, device=x.device)].view(c, h, w)
    ph, pw = h // g, w // g
    tiles = x.view(c, g, ph, g, pw).permute(1, 3, 0, 2, 4).reshape(g * g, c, ph, pw)
    tiles = tiles[torch.randperm(g * g, generator=gen, device=x.device)]
    return tiles.view(g, g, c, ph, pw).permute(2, 0, 3, 1, 4).reshape(c, h, w)


def constant_like(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(x, value)


class BackgroundSampler:
    """Draws one background per image per step.

    Args:
        kind: a registered kind ("gaussian", "uniform", "blur", "shuffle"), "constant", or
            "counterfactual" / "fills" (images from ``pool``, each image drawing only from
            ``eligible[i]``: other images of another label, or the image's own certified fills).
        x: ``[N,C,H,W]`` the images being explained.
        seed: the seed of every image's stream.
        pool: ``[P,C,H,W]`` counterfactual images, and ``eligible``: per image, a LongTensor of pool
            indices it may draw (images whose label differs from its own).
        constant: the value for "constant".
    """

    def __init__(self, kind, x, seed=0, pool=None, eligible=None, constant=0.0):
        if kind not in _POOLED and kind != "constant" and kind not in _KINDS:
            raise ValueError(f"unknown background {kind!r}; choose from {available() + ['constant', *_POOLED]}")
        self.kind, self.x, self.pool, self.eligible, self.constant = kind, x, pool, eligible, constant
        dev = x.device
        self.gens = [torch.Generator(device=dev).manual_seed(int(seed)) for _ in range(x.shape[0])]
        # pool indices come from CPU streams: no device sync per draw
        self.index_gens = [torch.Generator().manual_seed(int(seed) + 1) for _ in range(x.shape[0])]
        if kind in _POOLED:
            if pool is None or eligible is None or any(e.numel() == 0 for e in eligible):
                raise ValueError(f"{kind} backgrounds need a pool with an eligible image for every image")

    def select(self, keep: torch.Tensor) -> "BackgroundSampler":
        """The sampler of the images in ``keep`` (their streams continue where they were)."""
        new = object.__new__(BackgroundSampler)
        new.__dict__.update(self.__dict__)
        idx = keep.tolist()
        new.x = self.x[keep]
        new.gens = [self.gens[i] for i in idx]
        new.index_gens = [self.index_gens[i] for i in idx]
        if self.eligible is not None:
            new.eligible = [self.eligible[i] for i in idx]
        return new

    def uniform_like(self, like: torch.Tensor) -> torch.Tensor:
        """U[0,1) of ``like``'s shape ``[N,...]``, image i drawn from its own stream."""
        return torch.stack([torch.rand(like.shape[1:], generator=g, device=like.device, dtype=like.dtype)
                            for g in self.gens])

    def draw(self) -> torch.Tensor:
        """``[N,C,H,W]``: a fresh background for every image."""
        if self.kind == "constant":
            return constant_like(self.x, self.constant)
        if self.kind in _POOLED:
            picks = [int(e[torch.randint(e.numel(), (1,), generator=g)])
                     for e, g in zip(self.eligible, self.index_gens)]
            return self.pool[picks]
        fn = _KINDS[self.kind]
        return torch.stack([fn(xi, g) for xi, g in zip(self.x, self.gens)])

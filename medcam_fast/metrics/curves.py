"""Deletion and insertion curves and their AUC (Petsiuk et al., RISE, BMVC 2018)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (Forward, batched_logits, check_batch_size, check_images, check_labels, check_maps,
                      check_score, class_score, stable_rank_desc)


@dataclass
class CurveResult:
    """A deletion or insertion result for N images.

    Attributes:
        auc: ``[N]``, area under ``curve`` over the pixel fraction in [0, 1] (trapezoid rule).
        curve: ``[N, steps+1]``, the class score after each step (column 0: nothing changed yet).
        fractions: ``[steps+1]``, the fraction of pixels changed at each column (0 ... 1).
    """

    auc: Tensor
    curve: Tensor
    fractions: Tensor


def gaussian_blur(x: Tensor, kernel_size: int = 11, sigma: float = 5.0, padding: str = "replicate") -> Tensor:
    """Separable Gaussian blur of each channel, padded (``padding``: "replicate" or "reflect") so the
    output keeps x's size. The package's one Gaussian blur.

    Args:
        x: float ``[N,C,H,W]``.
        kernel_size: odd taps per axis. sigma: standard deviation in pixels.

    Returns:
        float ``[N,C,H,W]``.

    The defaults (11 taps, sigma 5) are RISE's insertion substrate (Petsiuk et al., "RISE:
    Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018, reference code
    ``evaluation.py``). RISE builds its kernel with scipy's ``gaussian_filter`` on a delta and
    zero-pads; here the kernel is the plain normalised truncated Gaussian and borders are
    replicated, so a constant image stays constant.
    """
    x = check_images(x, "x")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if padding not in ("replicate", "reflect"):
        raise ValueError(f"padding must be 'replicate' or 'reflect', got {padding!r}")
    n, c, h, w = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode=padding)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.view(n, c, h, w)


def _broadcast_to_x(value, x: Tensor, name: str) -> Tensor:
    """A number or a tensor broadcastable to x ``[N,C,H,W]`` → a tensor of x's shape."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a tensor broadcastable to x, got bool")
    if isinstance(value, (int, float)):
        return torch.full_like(x, float(value))
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{name} must be a number or a floating tensor broadcastable to x")
    try:
        return value.to(device=x.device, dtype=x.dtype).expand_as(x)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to x {tuple(x.shape)}") from None


def _check_steps(steps, hw: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= hw:
        raise ValueError(f"steps must be an int in [1, H*W={hw}], got {steps!r}")
    return steps


@torch.no_grad()
def _curve(forward, source: Tensor, target: Tensor, saliency: Tensor, label: Tensor, steps: int,
           score: str, batch_size: int) -> CurveResult:
    """Step i shows ``target`` on the k_i highest-ranked pixels and ``source`` elsewhere."""
    n, c, h, w = source.shape
    hw = h * w
    rank = stable_rank_desc(saliency.reshape(n, hw).to(torch.float64))
    ks = torch.div(torch.arange(steps + 1, device=source.device) * hw, steps, rounding_mode="floor")
    # all (image, step) pairs, chunked so at most batch_size perturbed images exist at once
    pair = torch.arange(n * (steps + 1), device=source.device)
    scores = []
    for i in range(0, pair.numel(), batch_size):
        p = pair[i:i + batch_size]
        img, st = p // (steps + 1), p % (steps + 1)
        changed = (rank[img] < ks[st, None]).view(-1, 1, h, w)
        imgs = torch.where(changed, target[img], source[img])
        scores.append(class_score(batched_logits(forward, imgs, batch_size), label[img], score))
    curve = torch.cat(scores).view(n, steps + 1)
    fractions = ks.to(curve.dtype) / hw
    return CurveResult(auc=torch.trapezoid(curve, fractions, dim=1), curve=curve, fractions=fractions)


def deletion(forward: Forward, x: Tensor, saliency: Tensor, label, steps: int = 20, baseline=0.0,
             score: str = "prob", batch_size: int = 64) -> CurveResult:
    """Deletion curve: replace the most salient pixels first by a baseline and track the score.

    Args:
        forward: classifier ``[B,C,H,W]`` → logits ``[B,K]`` (run under ``torch.no_grad()``).
        x: float ``[N,C,H,W]``.
        saliency: float or bool ``[N,H,W]``, higher = more important. Ties are broken by raster
            order (the lower row-major index goes first), so bool masks are valid too.
        label: int or long ``[N]``, the explained class.
        steps: the curve has ``steps+1`` points; step i has removed the top
            ``k_i = floor(i*H*W/steps)`` pixels (all channels), i.e. a fraction ``k_i/(H*W)``.
        baseline: what removed pixels become: a number (default 0) or a tensor broadcastable to
            ``[N,C,H,W]`` (e.g. a per-channel mean ``[1,C,1,1]``).
        score: ``"prob"`` (softmax p(label), as RISE) or ``"logit"``.
        batch_size: perturbed images built and forwarded per chunk.

    Returns:
        :class:`CurveResult`; lower ``auc`` = a better ranking (the score falls fast).

    Source: Petsiuk et al., "RISE", BMVC 2018, Sec. 4.1 ("deletion" metric; AUC as in their
    ``auc()``: trapezoid normalised to [0, 1]). RISE removes a fixed pixel count per step and
    breaks ties via numpy's argsort; here steps are evenly spaced fractions and ties are stable.
    """
    x = check_images(x, "x")
    n, _, h, w = x.shape
    saliency = check_maps(saliency, "saliency", n=n, hw=(h, w), device=x.device)
    label = check_labels(label, n, x.device)
    base = _broadcast_to_x(baseline, x, "baseline")
    return _curve(forward, x, base, saliency, label, _check_steps(steps, h * w), check_score(score),
                  check_batch_size(batch_size))


def insertion(forward: Forward, x: Tensor, saliency: Tensor, label, steps: int = 20, start=None,
              score: str = "prob", batch_size: int = 64) -> CurveResult:
    """Insertion curve: reveal the most salient pixels of x first on a start image, track the score.

    Args:
        forward, x, saliency, label, steps, score, batch_size: as in :func:`deletion`.
        start: the image the pixels of x are inserted into: None (default) = ``gaussian_blur(x)``
            with 11 taps and sigma 5 (RISE's substrate, see :func:`gaussian_blur`), or a number,
            or a tensor broadcastable to ``[N,C,H,W]``.

    Returns:
        :class:`CurveResult`; higher ``auc`` = a better ranking (the score rises fast). Column 0
        scores the start image, the last column scores x.

    Source: Petsiuk et al., "RISE", BMVC 2018, Sec. 4.1 ("insertion" metric).
    """
    x = check_images(x, "x")
    n, _, h, w = x.shape
    saliency = check_maps(saliency, "saliency", n=n, hw=(h, w), device=x.device)
    label = check_labels(label, n, x.device)
    src = gaussian_blur(x) if start is None else _broadcast_to_x(start, x, "start")
    return _curve(forward, src, x, saliency, label, _check_steps(steps, h * w), check_score(score),
                  check_batch_size(batch_size))

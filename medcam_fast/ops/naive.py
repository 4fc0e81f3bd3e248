"""Slow, obvious pure-PyTorch twins of the fused ops.

They are the test oracle, the fallback when the extension is missing, and the benchmark baseline.
Keep them simple: every line should be checkable by eye against the definitions in ``ops``.
"""
from __future__ import annotations

import math

import torch


def _mean_abs(d: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of |d| over dims 1..; a mean over no pairs is 0 (not NaN)."""
    count = d[0].numel() if d.shape[0] > 0 else 0
    return d.abs().flatten(1).sum(1) / max(count, 1)


def mask_priors(m: torch.Tensor, diagonal: bool = False, logits: bool = False,
                temperature: float = 1.0) -> torch.Tensor:
    """Area, binarisation and total variation of masks.

    Args:
        m: ``[N,1,H,W]`` mask in [0,1] (or logits when ``logits=True``).
        diagonal: add the two diagonal differences weighted 1/sqrt(2) (8-neighbour TV).
        logits: ``m`` holds logits; the mask is ``sigmoid(m / temperature)``.
        temperature: sigmoid temperature, > 0.

    Returns:
        ``[N,3]``: mean(p), mean(p(1-p)), and mean|vertical diff| + mean|horizontal diff|
        (+ (mean|diag| + mean|anti-diag|)/sqrt(2) when ``diagonal``).
    """
    p = torch.sigmoid(m / temperature) if logits else m
    p = p[:, 0]
    area = p.flatten(1).mean(1)
    binar = (p * (1 - p)).flatten(1).mean(1)
    tv = _mean_abs(p[:, 1:, :] - p[:, :-1, :]) + _mean_abs(p[:, :, 1:] - p[:, :, :-1])
    if diagonal:
        tv = tv + (_mean_abs(p[:, 1:, 1:] - p[:, :-1, :-1]) + _mean_abs(p[:, 1:, :-1] - p[:, :-1, 1:])) / math.sqrt(2)
    return torch.stack([area, binar, tv], dim=1)


def compose(x: torch.Tensor, m: torch.Tensor, baseline, background: torch.Tensor) -> torch.Tensor:
    """Masked-input composition into one classifier batch.

    Args:
        x: ``[N,C,H,W]`` images.
        m: ``[N,1,H,W]`` mask.
        baseline: number or tensor broadcastable to x (scalar, per-channel or full).
        background: ``[N,C,H,W]`` robustness background.

    Returns:
        ``[2N,C,H,W]``: ``m*x + (1-m)*baseline`` then ``m*x + (1-m)*background``.
    """
    e = m * x + (1 - m) * baseline
    e_rob = m * x + (1 - m) * background
    return torch.cat([e, e_rob], dim=0)

"""The seven Med-CAM loss terms. Each returns a per-image ``[N]`` tensor and is a mean, so it does
not grow with image size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


def channel_rms(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image, per-channel RMS of ``[N,C,h,w]`` features → ``[N,C,1,1]`` (the MSE normaliser)."""
    return feat.pow(2).mean(dim=(2, 3), keepdim=True).sqrt().add(eps)


def activation_mse(feat: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Channel-normalised MSE: mean(((feat - target) / scale)^2) per image → ``[N]``.

    ``scale`` is :func:`channel_rms` of the target, so each channel counts equally.
    """
    return ((feat - target) / scale).pow(2).flatten(1).mean(1)


def activation_cosine(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the flattened maps, per image → ``[N]`` in [0, 2]."""
    return 1 - F.cosine_similarity(feat.flatten(1), target.flatten(1), dim=1, eps=1e-8)


def activation_matching(feats, targets, scales, weights, metrics) -> torch.Tensor:
    """Weighted mean over layers of the per-layer distance; ``metrics[l]`` is "mse" or "cosine"."""
    total = 0.0
    for f, t, s, w, metric in zip(feats, targets, scales, weights, metrics):
        d = activation_mse(f, t, s) if metric == "mse" else activation_cosine(f, t)
        total = total + w * d
    return total / sum(weights)


def kl_to_input(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T(x) || p_T(e)) of temperature-softened softmaxes, times T^2 (Hinton et al.) → ``[N]``."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_q = F.log_softmax(target_logits / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(1) * temperature ** 2


def label_ce(logits: torch.Tensor, label: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the label → ``[N]``; with temperature T, T * CE(logits / T), which keeps a
    gradient where a confident classifier's softmax saturates."""
    if temperature == 1.0:
        return F.cross_entropy(logits, label, reduction="none")
    return F.cross_entropy(logits / temperature, label, reduction="none") * temperature


def label_ce_hinge(logits: torch.Tensor, label: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    """relu(CE - floor) → ``[N]``: penalises the label's cross-entropy only above ``floor`` (e.g. the
    input's own CE, or -log tau for "p(label) >= tau"), so a sufficient mask feels no push to grow."""
    return F.relu(F.cross_entropy(logits, label, reduction="none") - floor)


def mask_priors(mask_logits: torch.Tensor, temperature: float, diagonal: bool) -> torch.Tensor:
    """Area, binarisation and TV of ``sigmoid(logits / T)`` through the fused op → ``[N,3]``."""
    return ops.mask_priors(mask_logits, diagonal=diagonal, logits=True, temperature=temperature)

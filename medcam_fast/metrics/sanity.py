"""Model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading from the top."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from ._common import check_images, check_labels, check_maps, stable_rank_desc

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _average_ranks(v: Tensor) -> Tensor:
    """float64 ``[N,M]`` → ``[N,M]`` ranks 0..M-1, tied values sharing their mean rank."""
    n, m = v.shape
    srt, order = v.sort(dim=1, stable=True)
    start = torch.ones_like(srt, dtype=torch.bool)
    start[:, 1:] = srt[:, 1:] != srt[:, :-1]
    # one id per tie group, unique across rows, so one scatter averages every group of the batch
    gid = (start.cumsum(dim=1) - 1) + torch.arange(n, device=v.device)[:, None] * m
    pos = torch.arange(m, device=v.device, dtype=torch.float64).expand(n, m)
    total = torch.zeros(n * m, dtype=torch.float64, device=v.device).index_add_(0, gid.flatten(), pos.flatten())
    count = torch.zeros(n * m, dtype=torch.float64, device=v.device).index_add_(
        0, gid.flatten(), torch.ones(n * m, dtype=torch.float64, device=v.device))
    mean_rank = (total / count.clamp_min(1))[gid]
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between paired maps, per image.

    Args:
        a, b: float or bool ``[N,H,W]`` (or any ``[N,...]`` of equal shape).

    Returns:
        float64 ``[N]`` in [-1, 1]: the Pearson correlation of the ranks, ties given their average
        rank (so it equals ``scipy.stats.spearmanr``); NaN where a map is constant.

    Source: Spearman, "The Proof and Measurement of Association between Two Things", Am. J.
    Psychol. 1904; used on saliency maps by Adebayo et al., NeurIPS 2018.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError("a and b must be tensors")
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"a and b must share a shape [N,...], got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.flatten(1).to(torch.float64))
    rb = _average_ranks(b.flatten(1).to(torch.float64).to(a.device))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(dim=1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def _top_mask(saliency: Tensor, top_fraction: float) -> Tensor:
    """Bool maps pass through; float maps keep their ``ceil(top_fraction*H*W)`` highest pixels."""
    if saliency.dtype == torch.bool:
        return saliency
    n, h, w = saliency.shape
    k = max(1, math.ceil(top_fraction * h * w))
    return (stable_rank_desc(saliency.flatten(1)) < k).view(n, h, w)


def _modules_under(model: nn.Module, prefix: str) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name == prefix or name.startswith(prefix + ".")]


def _randomise(model: nn.Module, prefixes: list[str], seed: int) -> None:
    """Re-initialise (in place) every module under the prefixes, under a fixed seed."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # seeds without touching the caller's RNG state
        torch.manual_seed(seed)
        for prefix in prefixes:
            for m in _modules_under(model, prefix):
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
                else:
                    for p in m.parameters(recurse=False):
                        with torch.no_grad():
                            p.normal_(0.0, 0.02)


def default_stages(model: nn.Module) -> list[list[str]]:
    """Default cascade: one stage per top-level child that holds parameters, from the output end
    back to the input (``named_children`` in reverse registration order).

    Returns:
        list of ``[name]`` stages for :func:`cascading_randomisation`.

    Source: the top-down, layer-by-layer cascade of Adebayo et al., NeurIPS 2018, Sec. 3.1; a
    model whose children are registered out of data-flow order needs explicit ``stages``.
    """
    return [[name] for name, child in reversed(list(model.named_children()))
            if any(True for _ in child.parameters())]


def cascading_randomisation(model: nn.Module, explain_fn: ExplainFn, x: Tensor, label, stages=None, seed: int = 0,
                            top_fraction: float = 0.1) -> list[dict]:
    """Cascading model-parameter randomisation: does the explanation change when the model does?

    Args:
        model: the trained classifier. It is deep-copied; the caller's model is never modified.
        explain_fn: ``explain_fn(model, x, label) -> saliency [N,H,W]`` (float or bool); it is
            called on the copy, first trained, then after each stage.
        x: float ``[N,C,H,W]``. label: int or long ``[N]``.
        stages: list of stages, each a list of module-name prefixes (as in ``named_modules``);
            stages are randomised cumulatively in the order given, which should run from the
            output layer towards the input. Default: :func:`default_stages`.
        seed: stage i is re-initialised under ``torch.manual_seed(seed + i)`` (the global RNG state
            is restored afterwards). Modules with ``reset_parameters()`` use it (their own init
            scheme); parameters held directly by modules without one get ``N(0, 0.02^2)``. Buffers
            other than those reset by ``reset_parameters`` (e.g. BatchNorm stats) are kept.
        top_fraction: float maps are compared as binary masks of their top ``ceil(top_fraction*H*W)``
            pixels (each map its own top 10% by default: the same area, so IoU is about position,
            not size); bool maps are compared as they are.

    Returns:
        one dict per stage: ``{"stage": "+".join(prefixes), "randomised": all prefixes so far,
        "iou": float32 [N], "spearman": float64 [N]}`` comparing the randomised model's map with
        the trained model's. IoU is NaN where both masks are empty; Spearman (average ranks,
        see :func:`spearman`) is NaN where a map is constant. A method passes the check when these
        fall as layers are randomised; IoU and Spearman near 1 at every stage mean the map does not
        depend on the model (Adebayo et al. compare absolute-value maps too: pass ``abs`` maps if
        sign is irrelevant).

    Source: Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency Maps",
    NeurIPS 2018, Sec. 3 (cascading randomisation from the top layer; Spearman rank correlation).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(explain_fn):
        raise ValueError("explain_fn must be callable as explain_fn(model, x, label)")
    x = check_images(x, "x")
    n, _, h, w = x.shape
    label = check_labels(label, n, x.device)
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float)) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    work = copy.deepcopy(model)
    if stages is None:
        stages = default_stages(work)
    if not isinstance(stages, (list, tuple)) or not stages or \
            not all(isinstance(s, (list, tuple)) and s and all(isinstance(p, str) for p in s) for s in stages):
        raise ValueError("stages must be a non-empty list of non-empty lists of module-name prefixes")
    for s in stages:
        for prefix in s:
            if not _modules_under(work, prefix):
                raise ValueError(f"stages: no module named {prefix!r} (or under it) in the model")

    def run():
        sal = explain_fn(work, x, label)
        return check_maps(sal.detach() if isinstance(sal, Tensor) else sal, "explain_fn output", n=n, hw=(h, w))

    ref = run()
    ref_mask = _top_mask(ref, top_fraction)
    out, done = [], []
    for i, s in enumerate(stages):
        _randomise(work, list(s), seed + i)
        done += list(s)
        sal = run()
        if sal.dtype != ref.dtype and torch.bool in (sal.dtype, ref.dtype):
            raise ValueError("explain_fn output must stay bool or stay float across stages")
        m = _top_mask(sal, top_fraction)
        inter = (m & ref_mask).flatten(1).sum(dim=1).float()
        union = (m | ref_mask).flatten(1).sum(dim=1).float()
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
        out.append({"stage": "+".join(s), "randomised": list(done), "iou": iou, "spearman": spearman(sal, ref)})
    return out

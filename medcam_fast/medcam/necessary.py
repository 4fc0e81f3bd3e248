"""The necessary side of an explanation: the smallest region whose removal loses the call under
every certified fill, checked against random regions of its area removed the same way.

A shortcut can be necessary without being sufficient alone (the call needs the lesion's context
as well): the sufficient side never points at it, this side does. Its ranking comes from a
source of :data:`NECESSARY_SOURCES` (a registry, like the fills); its candidates, choice, a*,
curve and random control reuse :mod:`.sufficiency`'s deletion test, so both sides share one
definition of the fills and their certification.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import sufficiency
from .verify import batched_logits, candidate_masks, choose, side_status

NECESSARY_STATUSES = ("ok", "null_keeps_label", "not_informative", "not_minimal", "not_flipped")

# name -> fn(explainer, ctx) -> mask logits [N,1,H,W] ranking pixels by how much the call needs them
NECESSARY_SOURCES: dict[str, Callable] = {}


def register_necessary_source(name: str):
    def wrap(fn):
        NECESSARY_SOURCES[name] = fn
        return fn
    return wrap


def get_necessary_source(name: str) -> Callable:
    if name not in NECESSARY_SOURCES:
        raise ValueError(f"unknown necessary-side source {name!r}; available: {sorted(NECESSARY_SOURCES)}")
    return NECESSARY_SOURCES[name]


@register_necessary_source("fit")
def _deletion_fit(explainer, ctx: dict) -> torch.Tensor:
    """Its own U-Net fit with the deletion objective (the label lost without the mask)."""
    cfg = explainer.config.replace(objective="deletion")
    logits, _ = explainer._fit(ctx["x"], ctx["label"], ctx["logits_x"], ctx["feats_x"], ctx["pool"], ctx["fills"],
                               ctx["seed"], ctx["step_clf"], cfg=cfg)
    return logits


@torch.no_grad()
def coarse_to_fine_occlusion(forward, x: torch.Tensor, label: torch.Tensor, fill: torch.Tensor,
                             levels=(4, 8, 16, 32), keep: int = 4, batch_size: int = 64) -> torch.Tensor:
    """A cheap removal map ``[N,H,W]``. At each level the image is a ``g``-per-side grid and a
    window is 2x2 of its cells (stride one cell, so any region up to a cell lies whole inside
    one); a window's pixels are filled from ``fill`` ``[N,C,H,W]`` and the label's margin drop
    (>= 0) is its score. The first level tries every window; each finer level only the windows
    inside each image's ``keep`` best windows of the level before. A pixel's score is the sum
    over levels of the best window holding it, blurred by a quarter of the finest cell (no
    plateaus). Passes per image: (g0-1)² + keep * (2r-1)² per further level (r = the grids'
    ratio): 9 + 36 + 36 + 36 with the defaults. The finest cell, 1/32 of the side, is
    occlusion's stride: stopping at 1/16 missed the mark on 8-25% of val cases (the suite's val
    split, 12 per case), 1/32 on none.
    """
    n, _, h, w = x.shape
    base = sufficiency.margins(forward(x), label)                                  # [N]
    score = torch.zeros(n, h, w, device=x.device)
    parents, prev = None, None                                                     # [N,keep,2] anchors
    for g in levels:
        if g > min(h, w):
            break
        ys = torch.linspace(0, h, g + 1).round().long().tolist()
        xs = torch.linspace(0, w, g + 1).round().long().tolist()
        if parents is None:
            grid = torch.stack(torch.meshgrid(torch.arange(g - 1), torch.arange(g - 1), indexing="ij"), -1)
            anchors = grid.reshape(1, -1, 2).expand(n, -1, -1)
        else:
            q = g // prev
            off = torch.stack(torch.meshgrid(torch.arange(2 * q - 1), torch.arange(2 * q - 1), indexing="ij"), -1)
            anchors = (parents[:, :, None] * q + off.reshape(1, 1, -1, 2)).flatten(1, 2)
        k = anchors.shape[1]
        masks = torch.zeros(n, k, h, w, dtype=torch.bool)
        for i in range(n):
            for j, (r, c) in enumerate(anchors[i].tolist()):
                masks[i, j, ys[r]:ys[r + 2], xs[c]:xs[c + 2]] = True
        masks = masks.to(x.device)
        m = masks[:, :, None].to(x.dtype)
        comp = (1 - m) * x[:, None] + m * fill[:, None]
        logits = batched_logits(forward, comp.flatten(0, 1), batch_size).view(n, k, -1)
        drop = (base[:, None] - sufficiency.margins(logits, label[:, None])).clamp(min=0)   # [N,K]
        score += torch.where(masks, drop[..., None, None], torch.zeros_like(drop[..., None, None])).amax(1)
        top = drop.topk(min(keep, k), dim=1).indices.cpu()
        parents, prev = torch.gather(anchors, 1, top[..., None].expand(-1, -1, 2)), g
    sigma = max(0.5, min(h, w) / prev / 4)
    return sufficiency.gaussian_blur(score[:, None], sigma)[:, 0]


def _removal_fill(fills: sufficiency.FillSet) -> torch.Tensor:
    """``[N,C,H,W]``: per image, its certified fill whose own margin is lowest (the first fill
    where none is certified: that image can show nothing either way)."""
    alone = torch.where(fills.certified, fills.margin_alone, torch.full_like(fills.margin_alone, float("inf")))
    pick = torch.where(fills.certified.any(1), alone.argmin(1), torch.zeros_like(alone[:, 0], dtype=torch.long))
    return fills.images[torch.arange(fills.images.shape[0]), pick.to(fills.images.device)]


def _occlusion_logits(explainer, ctx: dict) -> torch.Tensor:
    """:func:`coarse_to_fine_occlusion` under each image's removal fill, as mask logits in [-2, 2]."""
    cfg = explainer.config
    score = coarse_to_fine_occlusion(explainer._frozen_forward, ctx["x"], ctx["label"], _removal_fill(ctx["fills"]),
                                     batch_size=cfg.max_batch)
    top = score.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]
    return (4 * score / top - 2)[:, None]


@register_necessary_source("occlusion")
def _occlusion(explainer, ctx: dict) -> torch.Tensor:
    """A coarse-to-fine occlusion map under the certified fills (117 passes per image), no fit."""
    return _occlusion_logits(explainer, ctx)


@register_necessary_source("occlusion+fit")
def _occlusion_fit(explainer, ctx: dict) -> torch.Tensor:
    """The deletion fit warm-started from the coarse-to-fine occlusion map's logits."""
    base = _occlusion_logits(explainer, ctx)
    cfg = explainer.config.replace(objective="deletion")
    logits, _ = explainer._fit(ctx["x"], ctx["label"], ctx["logits_x"], ctx["feats_x"], ctx["pool"], ctx["fills"],
                               ctx["seed"], ctx["step_clf"], base=base, cfg=cfg)
    return logits


@register_necessary_source("shared")
def _shared(explainer, ctx: dict) -> torch.Tensor:
    """The sufficient side's ranking, no extra fit: its top pixels are tried as removals."""
    return ctx["sufficient_logits"]


def necessary_status_of(flips: bool, testable: bool, random_flip: float, area: float, cfg,
                        fills_alone: str = "", certified: str = "") -> tuple[str, str]:
    """The necessary side's :func:`.verify.side_status` (``not_flipped`` where no candidate, removed,
    loses the call under every certified fill)."""
    return side_status("necessary", flips, testable, random_flip, area, cfg, fills_alone, certified)


@torch.no_grad()
def verify_necessary(forward, x: torch.Tensor, label: torch.Tensor, ranking: torch.Tensor,
                     fills: sufficiency.FillSet, cfg, seed: int) -> dict:
    """The necessary side's checks for mask logits ``ranking`` ``[N,1,H,W]``.

    Candidates are the threshold mask and the ranking's top-a level sets (``cfg.checks.area_grid``),
    each removed under every certified fill; the smallest that loses the call under all of them is
    chosen (:func:`.verify.choose`; with none, the one of lowest best-case margin). Its random
    control draws ``cfg.checks.n_random`` blobs of its area, removed the same way.

    Returns ``[N]`` tensors ``mask`` (bool ``[N,H,W]``), ``area``, ``flipped``, ``prob_removed``
    (the highest p(label) with it removed), ``new_label`` (the class most fills give then),
    ``random_pass``, ``a_star``; ``curve`` ``[N,A]`` (highest p(label) with the top-a pixels
    removed); ``testable``, ``use`` ``[N,F]``; per-image ``selection``, ``status``, ``reason``.
    """
    n = x.shape[0]
    thr_logit = cfg.fit.mask_temperature * math.log(cfg.fit.threshold / (1 - cfg.fit.threshold))
    masks, names = candidate_masks(ranking, thr_logit, cfg.checks.area_grid)
    use = sufficiency.counted(fills)
    testable = use.any(1)
    res = sufficiency.run_side(forward, x, label, masks, fills, "deletion", cfg.max_batch)
    flips, prob_removed = sufficiency.flipped(res, use)
    meets = flips.clone()
    if not (cfg.checks.minimal_search or cfg.checks.repair):
        meets[:, 1:] = False
    idx, notes = choose(masks, names, meets, -sufficiency.best_margin(res, use), testable, cfg)
    rows = torch.arange(n, device=x.device)
    mask = masks[rows, idx]
    area = mask.flatten(1).float().mean(1)
    rate, _ = sufficiency.random_rate(forward, x, label, area, fills, 0.0, cfg.checks.n_random, seed, "deletion",
                                      cfg.max_batch, use)
    top1 = res.top1[rows, idx]                                            # [N,F]
    new_label = torch.stack([torch.bincount(t[u], minlength=1).argmax() if u.any() else label[i]
                             for i, (t, u) in enumerate(zip(top1, use))])
    out = {"mask": mask, "area": area, "flipped": flips[rows, idx], "prob_removed": prob_removed[rows, idx],
           "new_label": new_label, "random_pass": rate, "testable": testable, "use": use,
           "a_star": sufficiency.extremal_area(cfg.checks.area_grid, flips[:, 1:]), "curve": prob_removed[:, 1:],
           "selection": [f"{names[int(j)]}: {notes[i]}" for i, j in enumerate(idx)]}
    return with_statuses(out, fills, cfg)


def with_statuses(out: dict, fills: sufficiency.FillSet, cfg) -> dict:
    """``out`` (the necessary side's checks, full or adaptive) with its per-image ``status`` and
    ``reason`` (:func:`necessary_status_of`)."""
    out["status"], out["reason"] = [], []
    for i in range(out["mask"].shape[0]):
        s, r = necessary_status_of(bool(out["flipped"][i]), bool(out["testable"][i]), float(out["random_pass"][i]),
                                   float(out["area"][i]), cfg, ", ".join(fills.names), fills.described(i, out["use"]))
        out["status"].append(s)
        out["reason"].append(r)
    return out

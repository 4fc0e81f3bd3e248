"""The one definition of "sufficient" in the package: the fills of removed pixels, their
certification per image, the preservation and deletion tests, the random-blob and shape-only
controls, the evidence curve and the extremal area a*. ``explain``, the report and the
evaluation harness all call this module.

A fill replaces the pixels a mask removes. A blank (constant) fill alone already gives the label
for many images, so "kept on a blank" can be vacuous (SIS, Carter et al. 2019, checks the fully
masked input first). Here every fill that does not depend on the mask is *certified* per image:
it counts only when f(fill alone) does not give the label, by ``certify_margin`` on the logits.
Blurred copies of x itself (extremal perturbations, Fong et al. 2019; Dabkowski & Gal 2017) and
its mean keep a mask's outline from reading as a hole. Mask-dependent fills (``impute``: the
removed pixels from their kept neighbours, in the spirit of ROAD) have no "fill alone"; they
count only where random blobs fail under them.

Margins are logit(label) - max other logit. Preservation: m*x + (1-m)*F must give the label by
min(``keep_margin``, ``keep_share`` * the margin on x) under every counted fill F (not a knife edge,
and no more than the call itself has). Deletion: (1-m)*x + m*F must lose it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..metrics.curves import gaussian_blur as _gaussian_blur
from ..metrics.random_scores import blob_scores
from ..metrics.topk import top_k_mask
from .verify import batched_logits

SIDES = ("preservation", "deletion")

_FILLS: dict[str, Callable] = {}          # name -> fn(x [N,C,H,W], baseline) -> [N,C,H,W]
_MASK_FILLS: dict[str, Callable] = {}     # name -> fn(x [N,C,H,W], keep [N,M,H,W] float) -> [N,M,C,H,W]


def register_fill(name: str, mask_dependent: bool = False):
    def wrap(fn):
        (_MASK_FILLS if mask_dependent else _FILLS)[name] = fn
        return fn
    return wrap


def available_fills() -> tuple[list[str], list[str]]:
    """(mask-independent fills, mask-dependent fills)."""
    return sorted(_FILLS), sorted(_MASK_FILLS)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N,C,H,W]`` with reflect padding (radius 3 sigma, < the side)."""
    r = max(1, min(int(math.ceil(3 * sigma)), x.shape[-2] - 1, x.shape[-1] - 1))
    return _gaussian_blur(x, 2 * r + 1, float(sigma), padding="reflect")


@register_fill("baseline")
def _baseline(x, baseline):
    """The constant baseline (Med-CAM's blank)."""
    return torch.full_like(x, baseline)


@register_fill("blur_fine")
def _blur_fine(x, baseline):
    """x blurred with sigma = 5% of the shorter side."""
    return gaussian_blur(x, 0.05 * min(x.shape[-2:]))


@register_fill("blur_coarse")
def _blur_coarse(x, baseline):
    """x blurred with sigma = 15% of the shorter side."""
    return gaussian_blur(x, 0.15 * min(x.shape[-2:]))


@register_fill("mean")
def _mean(x, baseline):
    """Each image's per-channel mean."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()


@register_fill("impute", mask_dependent=True)
def _impute(x, keep):
    """Removed pixels from their kept neighbours: normalised convolution (a Gaussian of sigma 5% of
    the side over kept pixels only), the kept pixels' mean where none is near."""
    n, m_count = keep.shape[:2]
    sigma = 0.05 * min(x.shape[-2:])
    k = keep.unsqueeze(2)                                                 # [N,M,1,H,W]
    num = gaussian_blur((k * x[:, None]).flatten(0, 1), sigma)
    den = gaussian_blur(k.expand(-1, -1, 1, -1, -1).flatten(0, 1), sigma)
    kept_mean = (k * x[:, None]).sum((-2, -1), keepdim=True) / k.sum((-2, -1), keepdim=True).clamp(min=1)
    out = torch.where(den > 1e-3, num / den.clamp(min=1e-3), kept_mean.flatten(0, 1).expand_as(num))
    return out.view(n, m_count, *x.shape[1:])


def margins(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """logit(label) - max other logit: ``[..., K]`` logits, ``label`` broadcastable to ``[...]``."""
    lab = label.expand(logits.shape[:-1]).unsqueeze(-1)
    own = logits.gather(-1, lab)[..., 0]
    other = logits.scatter(-1, lab, float("-inf")).amax(-1)
    return own - other


@dataclass
class FillSet:
    """The mask-independent fills of N images and their certification.

    images ``[N,F,C,H,W]``; names (F); margin_alone ``[N,F]``: the label's margin on the fill alone;
    certified ``[N,F]`` bool: margin_alone <= -certify_margin; mask_fills: the mask-dependent ones.
    """

    images: torch.Tensor
    names: tuple[str, ...]
    margin_alone: torch.Tensor
    certified: torch.Tensor
    mask_fills: tuple[str, ...] = ()

    def select(self, idx) -> "FillSet":
        """The fills of images ``idx`` (a list or LongTensor)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        d = self.certified.device
        return FillSet(self.images[idx.to(self.images.device)], self.names, self.margin_alone[idx.to(d)],
                       self.certified[idx.to(d)], self.mask_fills)

    @property
    def none_certified(self) -> torch.Tensor:
        return ~self.certified.any(1)

    def described(self, i: int, use: torch.Tensor | None = None) -> str:
        """The fills that count for image ``i``: its certified ones, or those of ``use`` ``[N,F]``
        (:func:`counted`, mask-dependent ones included)."""
        names = self.names + self.mask_fills
        flags = (self.certified[i] if use is None else use[i]).tolist()
        ok = [n for n, c in zip(names, flags) if c]
        return ", ".join(ok) if ok else "none"


@torch.no_grad()
def fill_images(x: torch.Tensor, names, baseline: float) -> torch.Tensor:
    """``[N,F,C,H,W]``: the plain fills ``names`` of ``x`` ``[N,C,H,W]``."""
    return torch.stack([_FILLS[f](x, baseline) for f in names], dim=1)


@torch.no_grad()
def certify(forward, x: torch.Tensor, label: torch.Tensor, names, baseline: float, certify_margin: float,
            batch_size: int = 64, mask_fills=()) -> FillSet:
    """Builds the fills ``names`` of ``x`` ``[N,C,H,W]`` and certifies each per image: f(fill) must
    not give ``label`` ``[N]``, another class leading by at least ``certify_margin``."""
    unknown = [f for f in names if f not in _FILLS] + [f for f in mask_fills if f not in _MASK_FILLS]
    if unknown or not names:
        raise ValueError(f"unknown or no fills {unknown or list(names)}; choose from {available_fills()}")
    images = fill_images(x, names, baseline)
    n, f = images.shape[:2]
    logits = batched_logits(forward, images.flatten(0, 1), batch_size).view(n, f, -1)
    alone = margins(logits, label[:, None])
    return FillSet(images, tuple(names), alone, alone <= -certify_margin, tuple(mask_fills))


@dataclass
class SideResult:
    """One side of the test for masks ``[N,M]``: per fill margins ``[N,M,F]`` (F = the certified
    set's fills, then the mask-dependent ones), p(label) ``[N,M,F]`` and the top-1 class ``[N,M,F]``."""

    margin: torch.Tensor
    prob: torch.Tensor
    top1: torch.Tensor | None = None


@torch.no_grad()
def run_side(forward, x, label, masks, fills: FillSet, side: str = "preservation", batch_size: int = 64) -> SideResult:
    """Classifies every mask under every fill. ``side`` "preservation": m*x + (1-m)*F (the mask
    kept); "deletion": (1-m)*x + m*F (the mask removed). ``masks`` bool ``[N,M,H,W]``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    keep = masks.to(x.dtype)
    if side == "deletion":
        keep = 1 - keep
    n, m_count = keep.shape[:2]
    parts = [fills.images[:, None].expand(-1, m_count, -1, -1, -1, -1)]        # [N,M,F,C,H,W]
    for name in fills.mask_fills:
        parts.append(_MASK_FILLS[name](x, keep)[:, :, None])
    rest = torch.cat(parts, dim=2)
    k = keep[:, :, None, None]                                               # [N,M,1,1,H,W]
    comp = k * x[:, None, None] + (1 - k) * rest
    f = comp.shape[2]
    logits = batched_logits(forward, comp.flatten(0, 2), batch_size).view(n, m_count, f, -1)
    lab = label.view(n, 1, 1)
    return SideResult(margins(logits, lab), logits.softmax(-1).gather(-1, lab.expand(n, m_count, f)[..., None])[..., 0],
                      logits.argmax(-1))


def counted(fills: FillSet, extra_ok: torch.Tensor | None = None) -> torch.Tensor:
    """``[N,F]`` bool: the fills that count: certified mask-independent ones, and the mask-dependent
    ones where ``extra_ok`` ``[N,F_mask]`` (their random control discriminates; default: not)."""
    n = fills.certified.shape[0]
    extra = torch.zeros(n, len(fills.mask_fills), dtype=torch.bool, device=fills.certified.device)
    if extra_ok is not None:
        extra = extra_ok.to(extra.device)
    return torch.cat([fills.certified, extra], dim=1)


def worst_margin(res: SideResult, use: torch.Tensor) -> torch.Tensor:
    """``[N,M]``: the lowest margin over the fills in ``use`` ``[N,F]`` (NaN where none counts)."""
    u = use[:, None].expand_as(res.margin)
    worst = torch.where(u, res.margin, torch.full_like(res.margin, float("inf"))).amin(-1)
    return torch.where(torch.isinf(worst) & (worst > 0), torch.full_like(worst, float("nan")), worst)


def required_margin(margin_x: torch.Tensor, keep_margin: float, keep_share: float) -> torch.Tensor:
    """``[N]``: the margin a sufficient mask must keep, min(keep_margin, keep_share * margin on x),
    at least 0: a weakly confident call is not asked for more than it has."""
    return torch.minimum(torch.full_like(margin_x, keep_margin), keep_share * margin_x).clamp(min=0)


def preserved(res: SideResult, use: torch.Tensor, need) -> tuple[torch.Tensor, torch.Tensor]:
    """(sufficient ``[N,M]``, worst p(label) ``[N,M]``) over the fills in ``use`` ``[N,F]``:
    the label kept by ``need`` (a float or ``[N]``, see :func:`required_margin`) under every one.
    False (and NaN) where none counts."""
    need = torch.as_tensor(need, dtype=res.margin.dtype, device=res.margin.device)
    need = need.view(-1, 1) if need.dim() else need
    u = use[:, None].expand_as(res.margin)
    worst = worst_margin(res, use)                                        # NaN where none counts
    prob = torch.where(u, res.prob, torch.full_like(res.prob, float("inf"))).amin(-1)
    none = ~use.any(1)[:, None].expand_as(worst)
    return (worst >= need) & ~none, torch.where(none, torch.full_like(prob, float("nan")), prob)


def best_margin(res: SideResult, use: torch.Tensor) -> torch.Tensor:
    """``[N,M]``: the highest margin over the fills in ``use`` ``[N,F]`` (-inf where none counts)."""
    u = use[:, None].expand_as(res.margin)
    return torch.where(u, res.margin, torch.full_like(res.margin, float("-inf"))).amax(-1)


def flipped(res: SideResult, use: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flipped ``[N,M]``, highest p(label) ``[N,M]``) with the mask removed: the label lost under
    every fill in ``use``. False (NaN) where none counts."""
    u = use[:, None].expand_as(res.margin)
    best = best_margin(res, use)
    prob = torch.where(u, res.prob, torch.full_like(res.prob, float("-inf"))).amax(-1)
    none = ~use.any(1)[:, None].expand_as(best)
    return (best < 0) & ~none, torch.where(none, torch.full_like(prob, float("nan")), prob)


def random_blob_scores(k: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``[k,H,W]``: the smooth random scores whose top-a pixels are the random blobs of ``seed``."""
    return blob_scores(k, size, torch.Generator().manual_seed(int(seed) * 1_000_003 + 29))


def random_blob_masks(area: torch.Tensor, k: int, size: tuple[int, int], seed: int,
                      scores: torch.Tensor | None = None) -> torch.Tensor:
    """``[N,k,H,W]`` bool random blobs at each image's ``area`` ``[N]``; every image draws the same
    k blob maps from ``seed`` (alone or in a batch), or cuts ``scores`` (:func:`random_blob_scores`)."""
    scores = random_blob_scores(k, size, seed) if scores is None else scores
    n = area.shape[0]
    a = area.detach().double().cpu()[:, None].expand(-1, k).reshape(-1)
    return top_k_mask(scores.repeat(n, 1, 1), a).view(n, k, *size).to(area.device)


@dataclass
class Controls:
    """Per image ``[N]``: random_pass (share of K random blobs at the mask's area that pass the same
    preservation test), random_pass_by_fill ``[N,F]`` (per fill, the share kept by keep_margin),
    shape_keeps (f(m*max(x) + (1-m)*min(x)), the mask's outline with no content
    from x, gives the label by the required margin)."""

    random_pass: torch.Tensor
    random_pass_by_fill: torch.Tensor
    shape_keeps: torch.Tensor


def side_passes(res: SideResult, use: torch.Tensor, need, side: str) -> torch.Tensor:
    """``[N,M]`` bool: the masks that pass ``side``'s test, preservation (:func:`preserved`, by
    ``need``) or deletion (:func:`flipped`), over the fills in ``use`` ``[N,F]``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return preserved(res, use, need)[0] if side == "preservation" else flipped(res, use)[0]


@torch.no_grad()
def random_rate(forward, x, label, area: torch.Tensor, fills: FillSet, need, k: int, seed: int,
                side: str = "preservation", batch_size: int = 64, use: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, SideResult]:
    """``[N]``: the share of ``k`` random blobs at each image's ``area`` ``[N]`` that pass ``side``'s
    test (kept alone, or the label lost when they are removed), over ``use`` (default the certified
    fills); NaN where no fill counts. Also returns the blobs' :class:`SideResult`."""
    n = x.shape[0]
    blobs = random_blob_masks(area, k, tuple(x.shape[-2:]), seed)
    res = run_side(forward, x, label, blobs, fills, side, batch_size)
    use = counted(fills) if use is None else use
    ok = side_passes(res, use, need, side)
    rate = torch.where(use.any(1), ok.float().mean(1), torch.full((n,), float("nan"), device=ok.device))
    return rate, res


@torch.no_grad()
def controls(forward, x, label, mask, fills: FillSet, need, k: int, seed: int,
             batch_size: int = 64, use: torch.Tensor | None = None) -> Controls:
    """The leakage controls of masks ``[N,H,W]``: K random blobs at each mask's own area scored by
    the same test (over ``use`` ``[N,F]``, default the certified fills), and the shape-only image."""
    n = x.shape[0]
    area = mask.flatten(1).float().mean(1)
    rp, res = random_rate(forward, x, label, area, fills, need, k, seed, "preservation", batch_size, use)
    need = torch.as_tensor(need, dtype=res.margin.dtype, device=res.margin.device).expand(n)
    by_fill = (res.margin >= need.view(n, 1, 1)).float().mean(1)            # [N,F]
    hi, lo = x.amax(dim=(2, 3), keepdim=True), x.amin(dim=(2, 3), keepdim=True)
    m = mask[:, None].to(x.dtype)
    shape = m * hi + (1 - m) * lo
    shape_margin = margins(batched_logits(forward, shape, batch_size), label)
    return Controls(rp, by_fill, shape_margin >= need)


def extremal_area(areas, sufficient: torch.Tensor) -> torch.Tensor:
    """a* ``[N]``: the smallest of ``areas`` (M, ascending or not) whose top-a mask is sufficient
    (``sufficient`` ``[N,M]``); NaN where none is."""
    a = torch.as_tensor(areas, dtype=torch.float32, device=sufficient.device).expand_as(sufficient)
    best = torch.where(sufficient, a, torch.full_like(a, float("inf"))).amin(1)
    return torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)

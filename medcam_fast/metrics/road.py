"""ROAD: RemOve And Debias with noisy linear imputation (Rong et al., ICML 2022), batched on device."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (Forward, batched_logits, check_batch_size, check_images, check_labels, check_maps,
                      check_score, class_score)

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS = ("morf", "lerf")


def _neighbour_kernel(dtype, device) -> Tensor:
    """The imputer's weights: 1/6 for the 4 direct and 1/12 for the 4 diagonal neighbours."""
    d, e = 1.0 / 12.0, 1.0 / 6.0
    return torch.tensor([[d, e, d], [e, 0.0, e], [d, e, d]], dtype=dtype, device=device).view(1, 1, 3, 3)


@torch.no_grad()
def _coarse_guess(x: Tensor, known: Tensor, tol: float, max_iter: int, work: torch.dtype) -> Tensor:
    """A starting point for CG: the same fill solved on a 2x coarser grid (recursively), upsampled.

    CG needs O(hole diameter) iterations from a flat start; the coarse solution removes the smooth
    part of the error first (a multigrid-style warm start). It changes where CG starts, not the
    system it solves, so the result is the same up to ``tol``. Below 16 px: the known pixels' mean.
    """
    n_known = known.sum(dim=(1, 2, 3), keepdim=True)
    mean = (x * known).sum(dim=(1, 2, 3), keepdim=True) / n_known.clamp_min(1)
    h, w = x.shape[-2:]
    if min(h, w) < 32 or h % 2 or w % 2:
        return mean.expand_as(x)
    k_c = F.avg_pool2d(known, 2)
    x_c = F.avg_pool2d(x * known, 2) / k_c.clamp_min(1e-12)
    known_c = (k_c > 0).to(x.dtype)
    coarse = _solve_linear_fill(x_c * known_c, 1.0 - known_c, tol, max_iter, work)
    return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)


def _solve_linear_fill(x: Tensor, unknown: Tensor, tol: float, max_iter: int, work: torch.dtype) -> Tensor:
    """Jacobi-preconditioned conjugate gradient, one independent system per row of x ``[S,1,H,W]``.

    For each unknown pixel i: ``(sum_{j in-bounds} w_ij) v_i - sum_{j unknown} w_ij v_j
    = sum_{j known} w_ij x_j``, the system grad-cam assembles as a sparse matrix. The matrix is
    symmetric and weakly diagonally dominant, so CG applies; v lives on the full grid and is kept
    at 0 on known pixels so a 3x3 convolution is the matrix product. Search directions run in
    ``work``; the solution and a periodic true residual are kept in float64 (mixed-precision
    refinement), since a float32 residual stalls near 1e-4 absolute error on large holes."""
    x = x.to(torch.float64)
    unknown = unknown.to(torch.float64)
    known = 1.0 - unknown
    ops = {}
    for dt in {torch.float64, work}:
        k = _neighbour_kernel(dt, x.device)
        # sum of in-bounds neighbour weights; zero padding drops out-of-image neighbours as grad-cam does
        dsum = F.conv2d(torch.ones_like(x[:1], dtype=dt), k, padding=1)
        ops[dt] = (k, dsum, unknown.to(dt))

    def matvec(v):
        k, dsum, unk = ops[v.dtype]
        return unk * (dsum * v - F.conv2d(v, k, padding=1))

    def dot(a, b):
        return (a * b).sum(dim=(1, 2, 3), keepdim=True)

    tiny = torch.finfo(work).tiny
    inv_d = ops[work][2] / ops[work][1].clamp_min(tiny)
    b = unknown * F.conv2d(x * known, ops[torch.float64][0], padding=1)
    v = unknown * _coarse_guess(x, known, tol, max_iter, work)
    r = (b - matvec(v)).to(work)
    z = inv_d * r
    p = z
    rz = dot(r, z)
    limit = (tol * dot(b, b).sqrt()).to(work)
    done = dot(r, r).sqrt() <= limit
    for it in range(max_iter):
        if it % 16 == 0 and bool(done.all()):  # host sync only every 16 iterations
            break
        ap = matvec(p)
        pap = dot(p, ap)
        # converged systems are frozen so each result does not depend on its batch mates
        alpha = torch.where(done | (pap <= 0), torch.zeros_like(pap), rz / pap.clamp_min(tiny))
        v = v + alpha.to(torch.float64) * p.to(torch.float64)
        # the recursive residual drifts from b - Av; replace it by the float64 one now and then
        r = (b - matvec(v)).to(work) if it % 32 == 31 else r - alpha * ap
        done = done | (dot(r, r).sqrt() <= limit)
        z = inv_d * r
        rz_new = dot(r, z)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    else:
        if not bool(done.all()):
            warnings.warn(f"noisy_linear_impute: conjugate gradient stopped at max_iter={max_iter} before "
                          f"reaching tol={tol} on {int((~done).sum())} of {done.numel()} systems", RuntimeWarning)
    return torch.where(unknown > 0, v, x)


def noisy_linear_impute(x: Tensor, keep: Tensor, noise: float = 0.01, generator: torch.Generator | None = None,
                        tol: float | None = None, max_iter: int | None = None) -> Tensor:
    """Fill the removed pixels of each image by noisy linear imputation (ROAD's imputer).

    Args:
        x: float ``[N,C,H,W]``.
        keep: bool ``[N,H,W]``, True = known pixel (unchanged), False = removed (imputed).
        noise: std of the Gaussian noise added to every imputed value (absolute units of x);
            0.01 is the default of grad-cam's ``NoisyLinearImputer`` and of the ROAD code.
        generator: optional ``torch.Generator`` on x's device for the noise.
        tol: the solver stops when ``||residual|| <= tol * ||rhs||`` for every system (channel);
            default 1e-7 for float32/half x and 1e-10 for float64 x.
        max_iter: conjugate-gradient iteration cap (default ``10*(H+W) + 100``); a RuntimeWarning
            says when it was hit.

    Returns:
        float ``[N,C,H,W]``: x on kept pixels; on removed pixels the solution of "each removed pixel
        equals the weighted average of its in-image neighbours (weight 1/6 direct, 1/12 diagonal,
        normalised over the neighbours inside the image)", solved jointly over all removed pixels of
        a channel, plus ``noise * N(0, 1)``. Channels are independent systems.

    Source: Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods", ICML 2022, Sec. 4 (noisy linear imputation); the equations
    are those of grad-cam's ``pytorch_grad_cam.metrics.road.NoisyLinearImputer`` (taken from
    tleemann/road_evaluation), which solves them with scipy ``spsolve`` per image. Here every image
    and channel of the batch is solved at once on x's device with Jacobi-preconditioned conjugate
    gradient (float32 search directions, float64 solution and periodic true residual; all
    float64 for float64 x). On [0,1] images the default tolerances agree with ``spsolve`` to
    about 1e-6 (float32) and 1e-7 (float64) absolute. If every pixel is removed the system is
    singular (grad-cam's ``spsolve`` fails); the imputation is then 0 plus noise.
    """
    x = check_images(x, "x")
    n, c, h, w = x.shape
    keep = check_maps(keep, "keep", n=n, hw=(h, w), require_bool=True, device=x.device)
    if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if tol is None:
        tol = 1e-10 if work == torch.float64 else 1e-7
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if max_iter is None:
        max_iter = 10 * (h + w) + 100
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    unknown = (~keep)[:, None].expand(n, c, h, w).reshape(n * c, 1, h, w)
    filled = _solve_linear_fill(x.reshape(n * c, 1, h, w), unknown, float(tol), max_iter, work)
    if noise > 0:
        eps = torch.randn(filled.shape, generator=generator, device=x.device, dtype=torch.float64)
        filled = filled + noise * eps * unknown
    return filled.view(n, c, h, w).to(x.dtype)


def _check_percentiles(percentiles) -> list[float]:
    try:
        ps = [float(p) for p in percentiles]
    except TypeError:
        raise ValueError(f"percentiles must be a sequence of numbers, got {percentiles!r}") from None
    if not ps or any(not (0 < p < 100) for p in ps):
        raise ValueError(f"percentiles must be a non-empty sequence of numbers in (0, 100), got {percentiles!r}")
    return ps


def road_masks(saliency: Tensor, percentiles=DEFAULT_PERCENTILES, order: str = "morf") -> Tensor:
    """Which pixels ROAD removes, per image and removal percentage.

    Args:
        saliency: float or bool ``[N,H,W]``, higher = more important.
        percentiles: removal percentages r in (0, 100).
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).

    Returns:
        bool ``[N,P,H,W]``, True = removed.

    Definition (grad-cam's ``RemoveMostRelevantFirst``/``RemoveLeastRelevantFirst``, reproduced
    exactly): with q = (100 - r)/100, ``t = numpy.percentile(s, 100*q)`` (linear interpolation, in
    the saliency's precision) and MoRF removes the pixels with ``s >= t``; LeRF does the same on
    ``1 - s``. So about r% of pixels are removed and all ties at the threshold go together (a
    constant map removes everything). Note grad-cam's own ``percentile`` argument is 100 - r
    (the share kept); the default list 10..90 is symmetric, so averages agree.

    Source: Rong et al., ICML 2022, Sec. 5 (MoRF/LeRF orders).
    """
    saliency = check_maps(saliency, "saliency")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    ps = _check_percentiles(percentiles)
    n, h, w = saliency.shape
    s = saliency.flatten(1)
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    if order == "lerf":
        s = 1 - s
    srt = s.sort(dim=1).values
    m = h * w
    removed = []
    for r in ps:
        # numpy's "linear" percentile: virtual index (m-1)*q, lerp in the data's dtype
        vi = (m - 1) * ((100.0 - r) / 100.0)
        lo = min(int(math.floor(vi)), m - 1)
        hi = min(lo + 1, m - 1)
        t = torch.lerp(srt[:, lo], srt[:, hi], vi - lo)
        removed.append(s >= t[:, None])
    return torch.stack(removed, dim=1).view(n, len(ps), h, w)


@dataclass
class ROADResult:
    """ROAD for N images and P removal percentages.

    Attributes:
        percentiles: float ``[P]``, the removal percentages.
        base: ``[N]``, the class score on the unperturbed x.
        morf_curve, lerf_curve: ``[N,P]``, the class score after removing and imputing that
            share of pixels, most / least relevant first.
        morf, lerf: ``[N]``, ``mean_P(curve - base)`` (grad-cam's ``ROAD*RelevantFirstAverage``).
            Lower ``morf`` and higher ``lerf`` = a better attribution.
        combined: ``[N]``, ``(lerf - morf) / 2`` (grad-cam's ``ROADCombined``); higher = better.
    """

    percentiles: Tensor
    base: Tensor
    morf_curve: Tensor
    lerf_curve: Tensor
    morf: Tensor
    lerf: Tensor
    combined: Tensor


@torch.no_grad()
def road(forward: Forward, x: Tensor, saliency: Tensor, label, percentiles=DEFAULT_PERCENTILES,
         noise: float = 0.01, score: str = "prob", batch_size: int = 64,
         generator: torch.Generator | None = None, tol: float | None = None,
         max_iter: int | None = None) -> ROADResult:
    """ROAD MoRF and LeRF curves with noisy linear imputation, all images and percentages batched.

    Args:
        forward: classifier ``[B,C,H,W]`` → logits ``[B,K]`` (run under ``torch.no_grad()``).
        x: float ``[N,C,H,W]``.
        saliency: float or bool ``[N,H,W]``, higher = more important (see :func:`road_masks`).
        label: int or long ``[N]``, the explained class.
        percentiles: removal percentages in (0, 100); default 10, 20, ..., 90.
        noise, generator, tol, max_iter: passed to :func:`noisy_linear_impute`. With a generator
            the noise drawn for an image depends on ``batch_size`` (it is drawn per chunk).
        score: ``"prob"`` (softmax p(label); grad-cam with ``ClassifierOutputSoftmaxTarget``) or
            ``"logit"`` (grad-cam with ``ClassifierOutputTarget``).
        batch_size: perturbed images imputed and forwarded per chunk.

    Returns:
        :class:`ROADResult`.

    Source: Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
    ICML 2022; scores defined as in grad-cam's ``pytorch_grad_cam.metrics.road`` (score after
    imputation minus score on x, averaged over percentiles).
    """
    x = check_images(x, "x")
    n, c, h, w = x.shape
    saliency = check_maps(saliency, "saliency", n=n, hw=(h, w), device=x.device)
    label = check_labels(label, n, x.device)
    score = check_score(score)
    bs = check_batch_size(batch_size)
    ps = _check_percentiles(percentiles)
    p_count = len(ps)
    base = class_score(batched_logits(forward, x, bs), label, score)
    # removed pixels for every (order, image, percentage): [2, N, P, H, W]
    removed = torch.stack([road_masks(saliency, ps, o) for o in ORDERS])
    flat_removed = removed.view(2 * n * p_count, h, w)
    img_of = torch.arange(n, device=x.device).view(1, n, 1).expand(2, n, p_count).reshape(-1)
    scores = []
    for i in range(0, flat_removed.shape[0], bs):
        idx = img_of[i:i + bs]
        imputed = noisy_linear_impute(x[idx], ~flat_removed[i:i + bs], noise=noise, generator=generator,
                                      tol=tol, max_iter=max_iter)
        scores.append(class_score(batched_logits(forward, imputed, bs), label[idx], score))
    curves = torch.cat(scores).view(2, n, p_count)
    morf = (curves[0] - base[:, None]).mean(dim=1)
    lerf = (curves[1] - base[:, None]).mean(dim=1)
    return ROADResult(percentiles=torch.tensor(ps, dtype=curves.dtype, device=x.device), base=base,
                      morf_curve=curves[0], lerf_curve=curves[1], morf=morf, lerf=lerf, combined=(lerf - morf) / 2)

"""After the fit: binary candidates from the soft mask, the checks that make "kept" mean something
(null audit, counterfactual sufficiency), the choice of the smallest sufficient mask, the status."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..metrics.topk import top_k_mask

STATUSES = ("ok", "null_keeps_label", "not_minimal", "not_kept")


@torch.no_grad()
def batched_logits(forward, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``forward`` over ``x`` ``[B,C,H,W]`` in chunks → logits ``[B,K]``."""
    if x.shape[0] == 0:
        raise ValueError("batched_logits needs at least one input")
    return torch.cat([forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def candidate_masks(mask_logits: torch.Tensor, threshold_logit: float, areas) -> tuple[torch.Tensor, list[str]]:
    """Binary candidates per image: the threshold mask, then the top-a fraction of pixels ranked
    by the mask logits for each area a (level sets of the soft mask; :func:`top_k_mask`'s rule).

    Args:
        mask_logits: ``[N,1,H,W]``.
        threshold_logit: the logit of the 0.5 (or configured) threshold.
        areas: fractions in (0, 1].

    Returns:
        masks ``[N,M,H,W]`` bool (M = 1 + len(areas)) and their names.
    """
    flat = mask_logits[:, 0]
    masks = torch.stack([flat > threshold_logit, *[top_k_mask(flat, a) for a in areas]], dim=1)
    return masks, ["threshold"] + [f"top {a:.1%}" for a in areas]


@torch.no_grad()
def kept_robust_of_masks(forward, x, label, masks, backgrounds, batch_size: int = 64) -> torch.Tensor:
    """Fraction of composites ``m*x + (1-m)*x'`` keeping the label (Med-CAM's ``kept_robust``).

    Args:
        forward: ``[B,C,H,W] -> [B,K]`` logits.
        x: ``[N,C,H,W]``; label: ``[N]``; masks: bool ``[N,H,W]`` or ``[N,M,H,W]`` (M candidates).
        backgrounds: ``[N,k,C,H,W]`` counterfactual images.

    Returns:
        ``[N]`` or ``[N,M]`` in [0,1].
    """
    squeeze = masks.dim() == 3
    m = masks[:, None] if squeeze else masks
    every = torch.ones(m.shape[:2], dtype=torch.bool, device=m.device)
    # threshold 0: no candidate is ever stopped, every one runs all k composites in one chunk
    out = sequential_kept_robust(forward, x, label, m, backgrounds, every, 0.0, batch_size,
                                 chunk=backgrounds.shape[1])
    return out[:, 0] if squeeze else out


@dataclass
class Sufficiency:
    """Per image and candidate: kept on the baseline [N,M], p(label) [N,M], kept_robust [N,M]."""

    kept: torch.Tensor
    prob: torch.Tensor
    kept_robust: torch.Tensor


def allowed_failures(k: int, threshold: float) -> int:
    """Composites of ``k`` that a sufficient candidate may lose: the most f with 1 - f/k >= threshold."""
    return k - math.ceil(threshold * k - 1e-9)


@torch.no_grad()
def sequential_kept_robust(forward, x, label, masks, backgrounds, needed, threshold: float, batch_size: int,
                           chunk: int = 8) -> torch.Tensor:
    """kept_robust ``[N,M]`` for the candidates in ``needed`` ``[N,M]`` (NaN elsewhere), run ``chunk``
    composites at a time: a candidate stops once it has lost more than :func:`allowed_failures`, since
    it can no longer be sufficient. Its value is then the fraction over the composites it ran (below
    ``threshold`` by construction); every candidate that may be sufficient runs all K, so the
    decision is the one all K composites give, at a fraction of the passes.

    Args:
        masks: bool ``[N,M,H,W]``; backgrounds: ``[N,K,C,H,W]``; needed: bool ``[N,M]``.
    """
    n, m_count = masks.shape[:2]
    k = backgrounds.shape[1]
    limit = allowed_failures(k, threshold)
    out = torch.full((n, m_count), float("nan"), device=x.device)
    for j in range(m_count):
        rows = needed[:, j].nonzero().flatten()
        fails = torch.zeros(rows.numel(), dtype=torch.long, device=x.device)
        seen = torch.zeros_like(fails)
        live = torch.arange(rows.numel(), device=x.device)
        for c0 in range(0, k, chunk):
            if live.numel() == 0:
                break
            r = rows[live]
            mj = masks[r, j][:, None, None].to(x.dtype)                       # [R,1,1,H,W]
            comp = mj * x[r][:, None] + (1 - mj) * backgrounds[r, c0:c0 + chunk]
            kc = comp.shape[1]
            logits = batched_logits(forward, comp.flatten(0, 1), batch_size).view(r.numel(), kc, -1)
            fails[live] += (logits.argmax(-1) != label[r][:, None]).sum(1)
            seen[live] += kc
            live = live[fails[live] <= limit]
        out[rows, j] = 1 - fails.float() / seen.clamp(min=1).float()
    return out


@torch.no_grad()
def check_candidates(forward, x, label, masks, baseline: float, robust_bgs, batch_size: int,
                     threshold: float = 0.9, untestable: torch.Tensor | None = None) -> Sufficiency:
    """Runs f on every candidate's evidence m*x + (1-m)*baseline and, when ``robust_bgs``
    ``[N,K,C,H,W]`` is given, on its K composites m*x + (1-m)*x' (kept_robust = fraction kept).

    kept_robust is computed where it can matter: for the candidates kept on the baseline and for
    the threshold mask (a fallback), with :func:`sequential_kept_robust`; NaN for the others, and
    for every candidate of the ``untestable`` ``[N]`` images (no background of another label).
    Without backgrounds kept_robust is NaN everywhere."""
    n, m_count = masks.shape[:2]
    mf = masks.to(x.dtype).unsqueeze(2)                                 # [N,M,1,H,W]
    ev = mf * x.unsqueeze(1) + (1 - mf) * baseline                     # [N,M,C,H,W]
    logits = batched_logits(forward, ev.flatten(0, 1), batch_size).view(n, m_count, -1)
    prob = logits.softmax(-1).gather(2, label.view(n, 1, 1).expand(n, m_count, 1))[..., 0]
    kept = logits.argmax(-1) == label.view(n, 1)
    if robust_bgs is None:
        return Sufficiency(kept, prob, torch.full_like(prob, float("nan")))
    needed = kept.clone()
    needed[:, 0] = True
    if untestable is not None:
        needed[untestable.to(needed.device)] = False
    return Sufficiency(kept, prob, sequential_kept_robust(forward, x, label, masks, robust_bgs, needed, threshold,
                                                          batch_size))


def choose(masks, names, suff: Sufficiency, cfg):
    """Index ``[N]`` of the chosen candidate and a note per image.

    Sufficient = kept on the baseline and kept_robust >= ``cfg.robust_threshold``.
    With ``cfg.minimal_search``: the smallest sufficient candidate, preferring areas inside
    [min_area, max_area] (a degenerate one only when nothing else is sufficient). Without it: the
    threshold mask, or with ``cfg.repair`` the smallest sufficient candidate at least as large.
    Where sufficiency cannot be tested (no counterfactual background: kept_robust is NaN) an
    "empty but kept" mask proves nothing, so the threshold mask stays (repaired only for kept).
    With nothing sufficient: the kept candidate with the highest kept_robust (ties: smaller),
    else the threshold mask.
    """
    n = masks.shape[0]
    area = masks.flatten(2).float().mean(2)                             # [N,M]
    untestable = torch.isnan(suff.kept_robust[:, 0])
    sufficient = suff.kept & (suff.kept_robust >= cfg.robust_threshold)
    sane = (area >= cfg.min_area) & (area <= cfg.max_area)
    chosen, notes = [], []
    for i in range(n):
        a = area[i]
        if untestable[i]:
            s, minimal, label = suff.kept[i], False, "kept (sufficiency untestable)"
        else:
            s, minimal, label = sufficient[i], cfg.minimal_search, "sufficient"
        if s[0] and not minimal:
            chosen.append(0)
            notes.append(f"threshold mask {label}")
            continue
        allowed = s.clone() if minimal else (s & (a >= a[0]) if cfg.repair else torch.zeros_like(s))
        if minimal and (allowed & sane[i]).any():
            allowed &= sane[i]
        if allowed.any():
            idx = int(torch.where(allowed, a, torch.full_like(a, 2.0)).argmin())
            chosen.append(idx)
            notes.append(f"smallest {label}" if minimal else f"repaired: smallest larger {label}")
            continue
        kr = torch.nan_to_num(suff.kept_robust[i], nan=0.0)
        if suff.kept[i].any():
            score = torch.where(suff.kept[i], kr * 10 - a, torch.full_like(a, -1e9))
            idx = int(score.argmax())
            notes.append("nothing sufficient; the kept candidate with the best kept_robust")
        else:
            idx = 0
            notes.append("no candidate keeps the label")
        chosen.append(idx)
    return torch.tensor(chosen, device=masks.device), notes


def status_of(kept: bool, kept_robust: float, null_keeps: bool, area: float, cfg) -> tuple[str, str]:
    """The status rules, in order:

    1. ``not_kept``: f(evidence) does not give the label.
    2. ``null_keeps_label``: the blank (baseline) image already gives the label and sufficiency
       on other images' context is not shown (kept_robust below threshold or untestable).
    3. ``not_kept``: kept on the baseline, but not on other images' context (kept_robust below
       threshold), or no counterfactual background existed to test it.
    4. ``not_minimal``: area below ``min_area`` or above ``max_area`` (degenerate).
    5. ``ok``.
    """
    robust_ok = kept_robust == kept_robust and kept_robust >= cfg.robust_threshold  # NaN fails
    if not kept:
        return "not_kept", "f(evidence) does not give the label"
    if null_keeps and not robust_ok:
        return "null_keeps_label", "the blank image already gives this label; the evidence is not sufficient elsewhere"
    if not robust_ok:
        if kept_robust != kept_robust:
            return "not_kept", "no counterfactual background to test sufficiency on"
        return "not_kept", f"kept on the blank baseline but only {kept_robust:.0%} of counterfactual composites"
    if area < cfg.min_area or area > cfg.max_area:
        return "not_minimal", f"degenerate area {area:.1%} (outside {cfg.min_area:.1%}-{cfg.max_area:.0%})"
    return "ok", "kept, counterfactually sufficient and not degenerate"

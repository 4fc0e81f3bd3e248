"""After the fit: binary candidates from the soft mask, the choice of the smallest one that meets
the test of :mod:`.sufficiency`, the status; and the optional counterfactual audit (kept_robust)."""
from __future__ import annotations

import math

import torch

from ..metrics._common import batched_logits, is_oom
from ..metrics.topk import top_k_mask

STATUSES = ("ok", "null_keeps_label", "not_informative", "not_minimal", "not_kept")


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


def choose(masks, names, meets: torch.Tensor, score: torch.Tensor, testable: torch.Tensor, cfg):
    """Index ``[N]`` of the chosen candidate and a note per image.

    Args:
        masks: bool ``[N,M,H,W]`` candidates (index 0 the threshold mask); names: their names.
        meets: bool ``[N,M]``: the candidate meets the objective's test (sufficient; with
            ``objective`` "deletion" flipped when removed; "dual" both, else sufficient).
        score: ``[N,M]`` worst-case margin under the fills (the fallback's order).
        testable: bool ``[N]``: at least one fill counts (else nothing can be shown).

    With ``cfg.checks.minimal_search``: the smallest candidate that meets the test, preferring areas in
    [min_area, max_area] (a degenerate one only when nothing else does). Without it: the threshold
    mask, or with ``cfg.checks.repair`` the smallest meeting candidate at least as large. Untestable
    images keep the threshold mask. With nothing meeting the test: the candidate of highest score.
    """
    n = masks.shape[0]
    area = masks.flatten(2).float().mean(2)                             # [N,M]
    sane = (area >= cfg.checks.min_area) & (area <= cfg.checks.max_area)
    chosen, notes = [], []
    for i in range(n):
        a, s = area[i], meets[i]
        if not testable[i]:
            chosen.append(0)
            notes.append("threshold mask (no fill is certified: nothing can be shown)")
            continue
        if s[0] and not cfg.checks.minimal_search:
            chosen.append(0)
            notes.append("threshold mask meets the test")
            continue
        allowed = s.clone() if cfg.checks.minimal_search else (s & (a >= a[0]) if cfg.checks.repair else torch.zeros_like(s))
        if cfg.checks.minimal_search and (allowed & sane[i]).any():
            allowed &= sane[i]
        if allowed.any():
            chosen.append(int(torch.where(allowed, a, torch.full_like(a, 2.0)).argmin()))
            notes.append("smallest meeting the test" if cfg.checks.minimal_search else "repaired: smallest larger meeting the test")
            continue
        sc = torch.nan_to_num(score[i], nan=-1e9)
        chosen.append(int(torch.where(sc == sc.max(), a, torch.full_like(a, 2.0)).argmin()))
        notes.append("nothing meets the test; the candidate with the best worst-case margin")
    return torch.tensor(chosen, device=masks.device), notes


# each side's words for the same rules: (name of the failed test, its reason, the null reason, the
# random control's reason, the ok reason); {certified}, {fills_alone}, {rate}, {bound} filled in
_SIDE_WORDS = {
    "sufficient": ("not_kept", "the label is not kept by the required margin under every certified fill ({certified})",
                   "every fill alone ({fills_alone}) already gives this label: preservation cannot show evidence for "
                   "this class on this classifier",
                   "random blobs of this area pass the same test too ({rate:.0%} > {bound:.0%}): the test does not "
                   "tell this mask from chance here",
                   "sufficient under every certified fill ({certified}); random blobs of its area pass {rate:.0%}"),
    "necessary": ("not_flipped", "no candidate region, removed, changes the call under every certified fill "
                  "({certified})",
                  "every fill alone ({fills_alone}) already gives this label: removing pixels cannot show what the "
                  "call needs",
                  "random regions of this area removed the same way change the call too ({rate:.0%} > {bound:.0%}): "
                  "not told from chance here",
                  "removing it changes the call under every certified fill ({certified}); random regions of its "
                  "area do so in {rate:.0%}"),
}


def side_status(side: str, passes: bool, testable: bool, random_pass: float, area: float, cfg,
                fills_alone: str = "", certified: str = "") -> tuple[str, str]:
    """``(status, reason)`` of one side ("sufficient" or "necessary"), the rules in order:

    1. ``null_keeps_label``: no fill is certified (every fill alone already gives the label), so
       neither keeping nor removing pixels can show evidence for this class on this classifier.
    2. ``not_kept`` (sufficient: the label not kept by the required margin under every certified
       fill) or ``not_flipped`` (necessary: no candidate, removed, loses it under every one).
    3. ``not_informative``: random blobs of the same area pass the same test more often than
       ``random_bound``: the test does not tell this region from chance.
    4. ``not_minimal``: area below ``min_area`` or above ``max_area`` (degenerate).
    5. ``ok``.
    """
    if side not in _SIDE_WORDS:
        raise ValueError(f"side must be one of {tuple(_SIDE_WORDS)}, got {side!r}")
    failed, failed_why, null_why, random_why, ok_why = _SIDE_WORDS[side]
    words = dict(certified=certified, fills_alone=fills_alone, rate=random_pass, bound=cfg.checks.random_bound)
    if not testable:
        return "null_keeps_label", null_why.format(**words)
    if not passes:
        return failed, failed_why.format(**words)
    if not random_pass <= cfg.checks.random_bound:
        return "not_informative", random_why.format(**words)
    if area < cfg.checks.min_area or area > cfg.checks.max_area:
        return "not_minimal", f"degenerate area {area:.1%} (outside {cfg.checks.min_area:.1%}-{cfg.checks.max_area:.0%})"
    return "ok", ok_why.format(**words)


def status_of(sufficient: bool, testable: bool, random_pass: float, area: float, cfg,
              fills_alone: str = "", certified: str = "") -> tuple[str, str]:
    """The sufficient side's :func:`side_status`."""
    return side_status("sufficient", sufficient, testable, random_pass, area, cfg, fills_alone, certified)

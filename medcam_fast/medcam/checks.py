"""Adaptive checks: the decisions of the full test (:func:`.explainer.Explainer._verify` and
:func:`.necessary.verify_necessary`) in tens of classifier passes per image and side.

The full test classifies every candidate (the threshold mask and the 19 areas of ``area_grid``)
under every fill, and 16 random blobs under every fill: about 150 passes per side. Three exact
shortcuts and one search give the same decisions:

* **One fill at a time, stopping at the first failure.** A candidate passes only when it passes
  under *every* counted fill, so a candidate that fails under one needs no other. Each image tries
  first the fill most likely to fail (preservation: the one whose own margin is lowest; deletion:
  the highest, closest to keeping the label).
* **A search of the area grid.** The top-a masks are nested level sets of one ranking, so whether
  they pass is nearly monotone in a: an exponential search from the small end (positions 0, 1, 3,
  7, 15, ...) finds the first that passes, a bisection of the gap below it the smallest, and the
  threshold mask is tried only where it could still be chosen (its area at most the answer's).
  The answer has passed and its smaller neighbour failed, so both are confirmed by construction.
  Where the curve is not monotone the answer can differ from the full test's; the agreement on
  val is measured (``benchmarks/adaptive_checks_val.py``).
* **Sequential random controls.** Random blobs are drawn in the full test's order and stop as
  soon as the verdict ``rate <= random_bound`` over ``n_random`` draws is fixed whatever the rest
  would give (curtailment, exact), or, with ``random_confidence`` set (off by default; with 16
  draws curtailment decides first), once an exact one-sided binomial (Clopper-Pearson) bound
  settles the rate against the bound. The rate reported is over the draws run.
* **The control only where it can matter.** The status rules test the random control only after
  the side passes (:func:`.verify.side_status`), so it is skipped where no candidate passes
  (``random_pass`` NaN, ``random_draws`` 0), and every check is skipped where no fill is certified.

All of this runs as one generator per image and side; :func:`run_jobs` gathers every pending
request of every job into one batched classifier pass per round, so both sides and all images
share passes. Curves hold only the areas tested under every counted fill (NaN elsewhere): the full
test (``checks="full"``) gives the whole curve and is the one the evaluation tables use.
"""
from __future__ import annotations

import math
from typing import Generator

import torch

from . import sufficiency
from .verify import batched_logits, candidate_masks, choose, kept_robust_of_masks

Job = Generator[torch.Tensor, torch.Tensor, object]


def run_jobs(forward, jobs: list[Job], batch_size: int) -> tuple[list, list[int]]:
    """Runs generator ``jobs`` that yield composites ``[P,C,H,W]`` and receive their logits
    ``[P,K]``: each round, every pending request goes through ``forward`` in one batched pass.
    Returns each job's return value and the classifier passes (images) it asked for."""
    results: list = [None] * len(jobs)
    passes = [0] * len(jobs)
    pending: dict[int, torch.Tensor] = {}

    def advance(j, value):
        try:
            req = jobs[j].send(value)
        except StopIteration as stop:
            results[j] = stop.value
            return
        if req.shape[0] == 0:
            raise RuntimeError("a check job asked for no images")
        pending[j] = req
        passes[j] += int(req.shape[0])

    for j in range(len(jobs)):
        advance(j, None)
    while pending:
        order = list(pending)
        sizes = [pending[j].shape[0] for j in order]
        logits = batched_logits(forward, torch.cat([pending.pop(j) for j in order]), batch_size)
        for j, part in zip(order, logits.split(sizes)):
            advance(j, part)
    return results, passes


class _Image:
    """One image's view for the jobs: x ``[C,H,W]``, its label, its fills ``[F,C,H,W]`` and the
    counted ones in the order each side tries them."""

    def __init__(self, x, label: int, fill_images, margin_alone, counted):
        self.x, self.label, self.fills = x, label, fill_images
        cols = counted.nonzero().flatten().tolist()
        alone = margin_alone.tolist()
        self.order = {"preservation": sorted(cols, key=lambda c: alone[c]),
                      "deletion": sorted(cols, key=lambda c: -alone[c])}

    def composite(self, masks: torch.Tensor, side: str, col: int) -> torch.Tensor:
        """``[P,C,H,W]``: ``masks`` ``[P,H,W]`` kept (preservation) or removed (deletion), the rest
        from fill ``col``."""
        keep = masks[:, None].to(self.x.dtype)
        if side == "deletion":
            keep = 1 - keep
        return keep * self.x + (1 - keep) * self.fills[col]


def _test(img: _Image, masks: torch.Tensor, side: str, need: float, early_exit: bool = True):
    """Job step: ``masks`` ``[P,H,W]`` under the counted fills of ``side`` one at a time. Returns
    (passes ``[P]`` bool: kept by ``need`` / the label lost under every fill run; extreme margin
    ``[P]`` and p(label) ``[P]`` over the fills run (lowest for preservation, highest for deletion);
    top-1 ``[P,F]`` (-1: not run); complete ``[P]``: every counted fill was run)."""
    p = masks.shape[0]
    cols = img.order[side]
    pres = side == "preservation"
    alive = torch.ones(p, dtype=torch.bool)
    ran = torch.zeros(p, dtype=torch.long)
    ext = torch.full((p,), math.inf if pres else -math.inf)
    prob = ext.clone()
    top1 = torch.full((p, img.fills.shape[0]), -1, dtype=torch.long)
    for col in cols:
        idx = alive.nonzero().flatten() if early_exit else torch.arange(p)
        if idx.numel() == 0:
            break
        logits = (yield img.composite(masks[idx.to(masks.device)], side, col)).float().cpu()
        lab = torch.tensor([img.label])
        m = sufficiency.margins(logits, lab)
        pr = logits.softmax(-1)[:, img.label]
        ext[idx] = torch.minimum(ext[idx], m) if pres else torch.maximum(ext[idx], m)
        prob[idx] = torch.minimum(prob[idx], pr) if pres else torch.maximum(prob[idx], pr)
        top1[idx, col] = logits.argmax(-1)
        alive[idx] &= (m >= need) if pres else (m < 0)
        ran[idx] += 1
    return alive & (len(cols) > 0), ext, prob, top1, ran == len(cols)


def _binomial_cdf(s: int, n: int, p: float) -> float:
    """P(X <= s) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(s + 1))


def _solve(f, target: float) -> float:
    """The p in [0, 1] with ``f(p) == target`` for ``f`` decreasing in p (bisection to 1e-12)."""
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return (lo + hi) / 2


def binomial_bounds(passes: int, draws: int, confidence: float) -> tuple[float, float]:
    """Exact one-sided Clopper-Pearson (lower, upper) bounds on a rate with ``passes`` of ``draws``,
    each at ``confidence``: P(X >= passes | lower) = P(X <= passes | upper) = 1 - confidence."""
    a = 1 - confidence
    lo = 0.0 if passes == 0 else _solve(lambda p: _binomial_cdf(passes - 1, draws, p), 1 - a)
    hi = 1.0 if passes == draws else _solve(lambda p: _binomial_cdf(passes, draws, p), a)
    return lo, hi


def random_verdict(passes: int, draws: int, k: int, bound: float, confidence: float | None) -> str | None:
    """"above", "below" (the rate against ``bound``) or None (undecided) after ``passes`` of
    ``draws`` random regions, ``k`` the full test's draws: curtailment (the full test's verdict
    ``passes/k <= bound`` is fixed) or, with ``confidence``, an exact binomial bound clear of ``bound``."""
    allowed = math.floor(bound * k + 1e-9)
    if passes > allowed:
        return "above"
    if passes + (k - draws) <= allowed:
        return "below"
    if confidence is not None and draws:
        lo, hi = binomial_bounds(passes, draws, confidence)
        if lo > bound:
            return "above"
        if hi < bound:
            return "below"
    return None


def _random_control(img: _Image, area: float, side: str, need: float, cfg, seed: int, scores=None):
    """Job step: random blobs of ``area`` (the full test's draws, in its order; ``scores`` their
    :func:`.sufficiency.random_blob_scores`) kept or removed like the mask, drawn in the fewest
    that could settle the verdict. Returns (rate, draws)."""
    size = tuple(img.x.shape[-2:])
    blobs = sufficiency.random_blob_masks(torch.tensor([area]), cfg.checks.n_random, size, seed, scores)[0]
    blobs = blobs.to(img.x.device)
    k, bound = cfg.checks.n_random, cfg.checks.random_bound
    allowed = math.floor(bound * k + 1e-9)
    passes = drawn = 0
    while random_verdict(passes, drawn, k, bound, cfg.checks.random_confidence) is None:
        # the fewest draws after which all-pass or all-fail would decide
        chunk = max(1, min(allowed + 1 - passes, k - allowed + passes - drawn, k - drawn))
        ok = (yield from _test(img, blobs[drawn:drawn + chunk], side, need))[0]
        passes += int(ok.sum())
        drawn += chunk
    return passes / drawn, drawn


def _search(img: _Image, masks: torch.Tensor, areas: torch.Tensor, side: str, need: float, cfg, objective: str):
    """Job step: the candidates ``masks`` ``[M,H,W]`` (0 the threshold mask, then the grid) that
    :func:`.verify.choose` needs to choose as the full test would. Returns (meets ``[M]``, score
    ``[M]``, side_ok ``[M]``, complete ``[M]``, extreme p(label) ``[M]``, top-1 ``[M,F]``), unknown
    entries False/NaN; side_ok and the rest are of the side's own test (``objective`` may add the
    deletion test, "dual", or replace it, "deletion")."""
    m_count, f = masks.shape[0], img.fills.shape[0]
    meets = torch.zeros(m_count, dtype=torch.bool)
    score = torch.full((m_count,), math.nan)
    prob = torch.full((m_count,), math.nan)
    complete = torch.zeros(m_count, dtype=torch.bool)
    top1 = torch.full((m_count, f), -1, dtype=torch.long)
    side_ok = torch.zeros(m_count, dtype=torch.bool)

    def probe(j, pred_side):
        ok, ext, pr, t1, comp = yield from _test(img, masks[j:j + 1], pred_side, need)
        if pred_side == side:   # the side's own test: the fallback's score, the curve, a*
            score[j] = ext[0] if side == "preservation" else -ext[0]
            prob[j], complete[j], top1[j], side_ok[j] = pr[0], comp[0], t1[0], ok[0]
        return bool(ok[0])

    def meets_objective(j):
        if objective == "dual":   # both tests of the same candidate; the deletion test only if kept
            return (yield from probe(j, "preservation")) and (yield from probe(j, "deletion"))
        return (yield from probe(j, "deletion" if objective == "deletion" else "preservation"))

    def bisect(eligible):
        """The smallest eligible index that meets (eligible ascending in area): an exponential
        search from the small end (positions 0, 1, 3, 7, 15, ...) to the first that meets, then a
        bisection of the gap below it. Starting small keeps the answer small where p(label) is not
        monotone in the area (a large area that fails or a mid one that fails above a small one
        that meets: a bisection from the middle missed 3 of 232 val cases that way)."""
        lo, hi, pos = -1, len(eligible), 0
        while pos < len(eligible):
            if (yield from meets_objective(eligible[pos])):
                meets[eligible[pos]] = True
                hi = pos
                break
            lo = pos
            pos = len(eligible) - 1 if pos == len(eligible) - 1 else min(2 * pos + 1, len(eligible) - 1)
            if pos == lo:
                break
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if (yield from meets_objective(eligible[mid])):
                meets[eligible[mid]] = True
                hi = mid
            else:
                lo = mid
        return eligible[hi] if hi < len(eligible) else None

    grid = sorted(range(1, m_count), key=lambda j: float(areas[j]))
    sane = [j for j in grid if cfg.checks.min_area <= float(areas[j]) <= cfg.checks.max_area]
    thr_meets = None
    if not cfg.checks.minimal_search:   # the threshold mask; with repair, the smallest larger one meeting
        thr_meets = meets[0] = (yield from meets_objective(0))
        if thr_meets or not cfg.checks.repair:
            return meets, score, side_ok, complete, prob, top1
        answer = yield from bisect([j for j in grid if float(areas[j]) >= float(areas[0])])
    else:
        answer = yield from bisect(sane)
        if answer is None and len(sane) < len(grid):   # choose() falls back on degenerate areas
            answer = yield from bisect(grid)
        if answer is None or float(areas[0]) <= float(areas[answer]):
            meets[0] = (yield from meets_objective(0))
    if objective == "dual" and not bool(meets.any()):   # choose()'s fallback: preservation alone
        return (yield from _search(img, masks, areas, side, need, cfg, "preservation"))
    return meets, score, side_ok, complete, prob, top1


_SEARCH_KEYS = ("meets", "score", "side_ok", "complete", "prob", "top1")


def _side_job(img: _Image, masks, side: str, need: float, cfg, objective: str, testable: bool):
    """Job: one image's side, the search (:func:`_search`). Returns its tensors by name."""
    m_count, f = masks.shape[0], img.fills.shape[0]
    if not testable:   # no fill is certified: nothing to test, the threshold mask stays
        empty = torch.zeros(m_count, dtype=torch.bool)
        nan = torch.full((m_count,), math.nan)
        return dict(zip(_SEARCH_KEYS, (empty, nan, empty, empty, nan, torch.full((m_count, f), -1, dtype=torch.long))))
    areas = masks.flatten(1).float().mean(1).cpu()
    return dict(zip(_SEARCH_KEYS, (yield from _search(img, masks, areas, side, need, cfg, objective))))


def _chosen_job(img: _Image, mask, side: str, need: float, cfg, seed: int, passed: bool | None, scores=None):
    """Job: the chosen mask's extras. ``passed`` None (the sufficient side under another objective
    than preservation): its preservation test first. The sufficient side: its deletion under every
    counted fill, f on the baseline evidence and on the outline alone. Both: the random control
    where the side passed. Returns a dict."""
    out = {"random_pass": math.nan, "random_draws": 0}
    if side == "preservation":
        if passed is None:
            ok, ext, _, _, _ = yield from _test(img, mask[None], "preservation", need)
            passed = bool(ok[0])
            out.update(passed=passed, margin=float(ext[0]))
        ok, _, pr, _, _ = yield from _test(img, mask[None], "deletion", 0.0, early_exit=False)
        out.update(flipped=bool(ok[0]), prob_removed=float(pr[0]) if img.order["deletion"] else math.nan)
        m = mask[None, None].to(img.x.dtype)
        hi, lo = img.x.amax(dim=(1, 2), keepdim=True), img.x.amin(dim=(1, 2), keepdim=True)
        logits = (yield torch.cat([m * img.x + (1 - m) * cfg.baseline, m * hi + (1 - m) * lo])).float().cpu()
        out.update(ev_logits=logits[0],
                   shape_margin=float(sufficiency.margins(logits[1:], torch.tensor([img.label]))[0]))
    if passed:
        area = float(mask.float().mean())
        out["random_pass"], out["random_draws"] = yield from _random_control(img, area, side, need, cfg, seed, scores)
    return out


@torch.no_grad()
def adaptive_checks(forward, x: torch.Tensor, label: torch.Tensor, sufficient_logits: torch.Tensor,
                    necessary_logits: torch.Tensor | None, fills: sufficiency.FillSet, pool, need: torch.Tensor,
                    cfg, seed: int) -> tuple[dict, dict | None]:
    """Both sides' checks with the adaptive rule, every image and side batched together.

    Args:
        forward: ``[B,C,H,W] -> [B,K]`` logits (gradient-free).
        x: ``[N,C,H,W]``; label: ``[N]``; sufficient_logits, necessary_logits: mask logits
            ``[N,1,H,W]`` (the rankings; ``necessary_logits`` None: one side).
        fills: the certified fills; pool: the counterfactual pool (``audit_counterfactual``) or None.
        need: ``[N]`` the margin a sufficient mask keeps (:func:`.sufficiency.required_margin`).

    Returns:
        (the sufficient side's verdict, the necessary side's or None): dicts of ``[N]`` tensors with
        the keys of the full test's (``Explainer._verify``, ``verify_necessary`` before statuses)
        and ``check_passes`` ``[N]`` (classifier passes each image's side spent) and
        ``random_draws`` ``[N]``. ``curve`` ``[N,A]`` holds the areas tested under every counted
        fill, NaN elsewhere; ``margin`` and ``prob_*`` of a failing mask are over the fills run.
    """
    if fills.mask_fills:
        raise ValueError("the adaptive checks cover the mask-independent fills; with mask_fills use checks='full'")
    n, dev = x.shape[0], x.device
    thr_logit = cfg.fit.mask_temperature * math.log(cfg.fit.threshold / (1 - cfg.fit.threshold))
    use = sufficiency.counted(fills)
    testable = use.any(1)
    imgs = [_Image(x[i], int(label[i]), fills.images[i], fills.margin_alone[i].cpu(), use[i].cpu()) for i in range(n)]
    sides = [("preservation", sufficient_logits, cfg.objective)]
    if necessary_logits is not None:
        sides.append(("deletion", necessary_logits, "deletion"))
    cands = [candidate_masks(logits, thr_logit, cfg.checks.area_grid) for _, logits, _ in sides]
    side_need = {"preservation": [float(v) for v in need], "deletion": [0.0] * n}
    rows = torch.arange(n, device=dev)
    # round 1: the searches of every image and side, batched together
    jobs = [_side_job(imgs[i], masks[i], side, side_need[side][i], cfg, objective, bool(testable[i]))
            for (side, _, objective), (masks, _) in zip(sides, cands) for i in range(n)]
    searched, passes1 = run_jobs(forward, jobs, cfg.max_batch)
    found = []
    for s, (masks, names) in enumerate(cands):
        got = {k: torch.stack([p[k] for p in searched[s * n:(s + 1) * n]]) for k in _SEARCH_KEYS}
        idx, notes = choose(masks, names, got["meets"].to(dev), got["score"].to(dev), testable, cfg)
        found.append((got, idx.cpu(), masks[rows, idx], [f"{names[int(j)]}: {notes[i]}" for i, j in enumerate(idx)]))
    # round 2: the chosen masks' extras and random controls, both sides together
    scores = sufficiency.random_blob_scores(cfg.checks.n_random, tuple(x.shape[-2:]), seed)
    jobs = []
    for s, (side, _, objective) in enumerate(sides):
        got, idx, mask, _ = found[s]
        chosen_meets = got["meets"][torch.arange(n), idx] & testable.cpu()
        own = objective == "preservation" or side == "deletion"   # passed = the side's own test
        jobs += [_chosen_job(imgs[i], mask[i], side, side_need[side][i], cfg, seed,
                             bool(chosen_meets[i]) if own else None, scores) for i in range(n)]
    extras, passes2 = run_jobs(forward, jobs, cfg.max_batch)
    out = []
    for s, (side, _, objective) in enumerate(sides):
        got, idx, mask, selection = found[s]
        ex = extras[s * n:(s + 1) * n]
        at = torch.arange(n), idx
        grid_ok = got["side_ok"][:, 1:] & got["complete"][:, 1:]
        curve = torch.where(got["complete"][:, 1:], got["prob"][:, 1:], torch.full_like(got["prob"][:, 1:], math.nan))
        v = {"mask": mask, "area": mask.flatten(1).float().mean(1), "testable": testable, "use": use,
             "selection": selection, "a_star": sufficiency.extremal_area(cfg.checks.area_grid, grid_ok).to(dev),
             "curve": curve.to(dev), "random_pass": torch.tensor([e["random_pass"] for e in ex], device=dev),
             "random_draws": torch.tensor([e["random_draws"] for e in ex]),
             "check_passes": torch.tensor([passes1[s * n + i] + passes2[s * n + i] for i in range(n)])}
        if side == "preservation":
            if objective == "preservation":
                sufficient, margin = got["meets"][at] & testable.cpu(), got["score"][at]
            else:
                sufficient = torch.tensor([e["passed"] for e in ex])
                margin = torch.tensor([e["margin"] for e in ex])
            ev = torch.stack([e["ev_logits"] for e in ex]).to(dev)
            v.update(sufficient=sufficient.to(dev), margin=margin.to(dev), kept=ev.argmax(1) == label,
                     prob_evidence=ev.softmax(1).gather(1, label[:, None])[:, 0],
                     flipped=torch.tensor([e["flipped"] for e in ex], device=dev),
                     prob_removed=torch.tensor([e["prob_removed"] for e in ex], device=dev),
                     shape_keeps=torch.tensor([e["shape_margin"] for e in ex], device=dev) >= need,
                     kept_robust=torch.full((n,), math.nan, device=dev))
            if cfg.checks.audit_counterfactual and pool is not None and pool.verify_index is not None:
                kr = kept_robust_of_masks(forward, x, label, mask, pool.verify_backgrounds(), cfg.max_batch)
                v["kept_robust"] = torch.where(pool.missing.to(dev), v["kept_robust"], kr)
        else:
            top1 = got["top1"][at]                                         # [N,F], -1: not run
            v.update(flipped=(got["meets"][at] & testable.cpu()).to(dev), prob_removed=got["prob"][at].to(dev),
                     new_label=torch.stack([torch.bincount(t[t >= 0]).argmax() if (t >= 0).any() else label[i].cpu()
                                            for i, t in enumerate(top1)]).to(dev))
        out.append(v)
    return out[0], (out[1] if len(out) > 1 else None)

"""The full test of the sufficient side: every candidate under every fill (``checks.mode="full"``,
the evaluation tables' test); the necessary side's is :func:`.necessary.verify_necessary` and the
adaptive form of both is :mod:`.checks`."""
from __future__ import annotations

import math

import torch

from . import sufficiency
from .verify import batched_logits, candidate_masks, choose, kept_robust_of_masks


def verify_sufficient(forward, x: torch.Tensor, label: torch.Tensor, mask_logits: torch.Tensor, fills, pool, need,
                      cfg, seed: int) -> dict:
    """The full test of the sufficient side (``checks.mode="full"``) for mask logits ``[N,1,H,W]``:
    :mod:`.sufficiency` on every candidate under every counted fill, the choice, and the chosen
    mask's deletion side, controls, a* and evidence curve (``[N]`` tensors, ``curve`` ``[N,A]``).
    ``forward`` is the frozen classifier; ``cfg`` a MedCAMConfig."""
    fwd, n = forward, x.shape[0]
    thr_logit = cfg.fit.mask_temperature * math.log(cfg.fit.threshold / (1 - cfg.fit.threshold))
    masks, names = candidate_masks(mask_logits, thr_logit, cfg.checks.area_grid)   # threshold, then the grid
    use = sufficiency.counted(fills)
    testable = use.any(1)
    kept_side = sufficiency.run_side(fwd, x, label, masks, fills, "preservation", cfg.max_batch)
    sufficient, worst_prob = sufficiency.preserved(kept_side, use, need)
    worst_margin = sufficiency.worst_margin(kept_side, use)
    # the deletion side of every candidate only where the choice needs it; else of the chosen one
    flipped = prob_removed = None
    if cfg.objective != "preservation":
        flipped, prob_removed = sufficiency.flipped(
            sufficiency.run_side(fwd, x, label, masks, fills, "deletion", cfg.max_batch), use)
    meets = {"preservation": sufficient, "deletion": flipped,
             "dual": None if flipped is None else sufficient & flipped}[cfg.objective]
    if cfg.objective == "dual":   # both where some candidate has both, else sufficiency alone
        meets = torch.where(meets.any(1, keepdim=True), meets, sufficient)
    if not (cfg.checks.minimal_search or cfg.checks.repair):   # the threshold mask only
        meets = meets.clone()
        meets[:, 1:] = False
    idx, notes = choose(masks, names, meets, worst_margin, testable, cfg)
    rows = torch.arange(n, device=x.device)
    mask = masks[rows, idx]
    if flipped is None:
        flipped, prob_removed = sufficiency.flipped(
            sufficiency.run_side(fwd, x, label, mask[:, None], fills, "deletion", cfg.max_batch), use)
        flipped, prob_removed = flipped[:, 0], prob_removed[:, 0]
    else:
        flipped, prob_removed = flipped[rows, idx], prob_removed[rows, idx]
    mf = mask[:, None].to(x.dtype)
    ev_logits = batched_logits(fwd, mf * x + (1 - mf) * cfg.baseline, cfg.max_batch)
    ctl = sufficiency.controls(fwd, x, label, mask, fills, need, cfg.checks.n_random, seed, cfg.max_batch, use)
    chosen_ok = sufficient[rows, idx]
    if fills.mask_fills:
        # a mask-dependent fill counts where random blobs of the mask's area fail under it; the
        # chosen mask must then hold under it too (the candidates were ranked on the others)
        extra_ok = ctl.random_pass_by_fill[:, len(fills.names):] <= cfg.checks.random_bound
        use = sufficiency.counted(fills, extra_ok)
        chosen_ok = sufficiency.preserved(kept_side, use, need)[0][rows, idx]
        ctl = sufficiency.controls(fwd, x, label, mask, fills, need, cfg.checks.n_random, seed, cfg.max_batch, use)
    kept_robust = torch.full((n,), float("nan"), device=x.device)
    if cfg.checks.audit_counterfactual and pool is not None and pool.verify_index is not None:
        kr = kept_robust_of_masks(fwd, x, label, mask, pool.verify_backgrounds(), cfg.max_batch)
        kept_robust = torch.where(pool.missing.to(x.device), kept_robust, kr)
    return {
        "mask": mask, "area": mask.flatten(1).float().mean(1), "testable": testable, "use": use,
        "sufficient": chosen_ok, "margin": sufficiency.worst_margin(kept_side, use)[rows, idx],
        "kept": ev_logits.argmax(1) == label,
        "prob_evidence": ev_logits.softmax(1).gather(1, label[:, None])[:, 0],
        "flipped": flipped, "prob_removed": prob_removed,
        "random_pass": ctl.random_pass, "shape_keeps": ctl.shape_keeps, "kept_robust": kept_robust,
        "a_star": sufficiency.extremal_area(cfg.checks.area_grid, sufficient[:, 1:]),
        "curve": worst_prob[:, 1:],
        "selection": [f"{names[int(j)]}: {notes[i]}" for i, j in enumerate(idx)],
    }

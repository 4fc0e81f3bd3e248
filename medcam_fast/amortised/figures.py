"""Figures of an amortised explainer against the per-image fit, on the same images."""
from __future__ import annotations

import time
import warnings

import torch

from ..medcam import Explainer, MedCAMConfig
from ..medcam.result import Explanation


def _row(expl, seconds: float, n: int) -> dict:
    return {"ok": sum(s == "ok" for s in expl.status) / n, "area": float(expl.area.float().mean()),
            "sufficient": float(expl.sufficient.float().mean()), "seconds_per_image": seconds / n,
            "status": {s: expl.status.count(s) for s in sorted(set(expl.status))}}


def explainer_figures(model, amortised, x: torch.Tensor, config: MedCAMConfig | None = None, refine=(20,),
                      fit: bool = True, batch: int = 16, seed: int = 0) -> dict:
    """Status-``ok`` rate, mean area, sufficient rate and seconds per image of the amortised masks,
    of ``refine`` warm-started fits and (``fit``) of the per-image fit, on ``x`` ``[N,C,H,W]`` in
    calls of ``batch``; and ``wrong_label_pass``: the share of amortised masks asked for a class
    the classifier does not give (the next one, (y+1) mod K) that pass the sufficiency test.
    Also ``mask_pass_per_second``: the network's forward alone (no checks), batched."""
    cfg = config or MedCAMConfig()
    n = x.shape[0]
    explainers = {"amortised": Explainer(model, cfg, amortised=amortised)}
    explainers.update({f"amortised+refine{k}": Explainer(model, cfg, amortised=explainers["amortised"].amortised,
                                                          refine=k) for k in refine})
    if fit:
        explainers["fit"] = Explainer(model, cfg)
    for ex in explainers.values():   # warm-up: each Explainer traces its classifier on its first call
        ex(x[:2], seed=seed)
    rows, labels = {}, None
    for name, ex in explainers.items():
        parts, t0 = [], time.perf_counter()
        for s in range(0, n, batch):
            parts.append(ex(x[s:s + batch], seed=seed))
        seconds = time.perf_counter() - t0
        merged = Explanation.concat(parts)
        labels = merged.label if labels is None else labels
        rows[name] = _row(merged, seconds, n)
    k = explainers["amortised"].amortised.net.num_classes
    wrong = (labels + 1) % k
    with warnings.catch_warnings():   # "not kept" is what a wrong label should give
        warnings.simplefilter("ignore", RuntimeWarning)
        parts = [explainers["amortised"](x[s:s + batch], target=wrong[s:s + batch], seed=seed)
                 for s in range(0, n, batch)]
    net = explainers["amortised"].amortised
    xs = x[:batch].to(explainers["amortised"].device)
    with torch.no_grad():
        net(xs, labels[:batch].to(xs.device))
        t0 = time.perf_counter()
        for _ in range(5):
            net(xs, labels[:batch].to(xs.device))
        pass_seconds = (time.perf_counter() - t0) / (5 * xs.shape[0])
    return {"n": n, "rows": rows, "wrong_label_pass": float(Explanation.concat(parts).sufficient.float().mean()),
            "mask_pass_per_second": 1 / pass_seconds, "batch": batch}


"""Cascading model-parameter randomisation (Adebayo et al. 2018) of each method of the harness."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import metrics
from ..medcam import Explainer, MedCAMConfig
from .runner import PATCHNET_METHODS, EvalSet, _f


def run_sanity(model, data: EvalSet, out_dir, methods, n_images: int = 8, medcam_cfg: MedCAMConfig | None = None,
               seed: int = 0, stages=None) -> dict:
    """Cascading model-parameter randomisation (Adebayo et al. 2018) for each method, on the first
    ``n_images`` images: IoU and Spearman of each map against the trained model's map as the top
    stages are re-initialised one by one. Cached in ``sanity.json``."""
    from ..baselines.gradcam import cam_maps

    path = Path(out_dir) / "sanity.json"
    if path.is_file():
        return json.loads(path.read_text())
    x = data.x[:n_images]
    with torch.no_grad():
        label = model(x).argmax(1)
    cfg = (medcam_cfg or MedCAMConfig()).replace(checks=dict(batch_as_counterfactuals=False))

    def medcam_fn(m, xx, yy):
        return Explainer(m, cfg, counterfactuals=data.pool)(xx, target=yy, seed=seed).mask

    out = {}
    for method in methods:
        if method == "medcam":
            fn = medcam_fn
        elif method in PATCHNET_METHODS:
            from ..baselines.patchnet_saliency import patch_saliency

            fn = lambda m, xx, yy: patch_saliency(m, xx, yy, "raw")  # noqa: E731
        else:
            fn = lambda m, xx, yy, meth=method: cam_maps(m, xx, yy, method=meth)  # noqa: E731
        rows = metrics.cascading_randomisation(model, fn, x, label, stages=stages, seed=seed)
        out[method] = [{"stage": r["stage"], "iou": _f(r["iou"].nanmean()), "spearman": _f(r["spearman"].nanmean())}
                       for r in rows]
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out

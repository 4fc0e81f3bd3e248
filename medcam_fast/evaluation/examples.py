"""The example grid of the evaluation report: the first few test images with every method's map.

The maps are recomputed for the figure with the run's own settings (same configs, seeds and CAM
thresholds); records are not kept per pixel. Reference mode and the controls are left out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import metrics
from ..report.panels import GT_COLOUR, MASK_COLOUR, _display, _outline


def example_maps(ev, methods, n: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{method: (saliency [n,H,W] float, mask [n,H,W] bool)}`` on the first ``n`` images of
    ``ev.data`` (an :class:`~.runner.Evaluation`). The control masks are left out: they are no map."""
    from .runner import CONTROL_METHODS, MEDCAM_METHODS

    methods = [m for m in methods if m not in CONTROL_METHODS]
    idx = list(range(min(n, len(ev.data.ids))))
    x, y = ev.data.x[idx], ev.label[idx]
    out = {}
    thresholds = ev.thresholds([m for m in methods if m not in MEDCAM_METHODS])  # cached by the run
    for method in methods:
        if method == "medcam_reference":
            continue
        if method in MEDCAM_METHODS:
            res = ev.medcam_explainer(method)(x, target=y, seed=ev.opt.seed)
            out[method] = (res.soft_mask, res.mask)
        else:
            maps = ev.map_fn(method)(x, y)
            out[method] = (maps, metrics.binarise(maps, thresholds.get(method, 0.5)))
    return out


def _unit(x: torch.Tensor) -> np.ndarray:
    """An image ``[C,H,W]`` or map ``[H,W]`` stretched to [0,1], for display only."""
    a = x.detach().cpu().float()
    a = (a - a.min()) / (a.max() - a.min()).clamp(min=1e-8)
    return a.numpy()


def example_grid(x: torch.Tensor, gt: torch.Tensor, ids, maps: dict, out_dir, name: str = "examples.png") -> str:
    """Writes a grid (rows: images ``x`` [n,C,H,W]; columns: the image with its ground truth ``gt``
    [n,H,W], then each method's map with its binary mask outlined). Returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(maps)
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(2.1 * (len(methods) + 1), 2.2 * n), squeeze=False)
    for i in range(n):
        img, cmap = _display(_unit(x[i]))
        ax = axes[i][0]
        ax.imshow(img, cmap=cmap)
        _outline(ax, gt[i].cpu().numpy().astype(bool), GT_COLOUR)
        ax.set_title(f"{ids[i]}\n(red: lesion)" if i == 0 else str(ids[i]), fontsize=7)
        for j, m in enumerate(methods, start=1):
            sal, mask = maps[m]
            ax = axes[i][j]
            ax.imshow(img, cmap=cmap)
            ax.imshow(_unit(sal[i]), cmap="jet", alpha=0.4, vmin=0, vmax=1)
            _outline(ax, mask[i].cpu().numpy().astype(bool), MASK_COLOUR)
            _outline(ax, gt[i].cpu().numpy().astype(bool), GT_COLOUR, "dashed")
            area = float(mask[i].float().mean())
            ax.set_title(f"{m}\narea {area:.0%}" if i == 0 else f"area {area:.0%}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("map (colour), binary mask (cyan), lesion (red, dashed)", fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / name, dpi=100)
    plt.close(fig)
    return name

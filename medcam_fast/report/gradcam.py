"""Grad-CAM heat maps for the report's panels, never fatal: a missing or failing Grad-CAM leaves the
panel out with a note."""
from __future__ import annotations


def gradcam_maps(model, x, label, method: str = "gradcam"):
    """Grad-CAM maps ``[N,H,W]`` in [0,1] for ``x`` ``[N,C,H,W]`` and ``label`` ``[N]``, or None.

    Returns ``(maps or None, note or None)``. It never raises: a missing
    ``medcam_fast.baselines.gradcam`` (ImportError) or a failure inside it (e.g. a model whose layers
    cannot be hooked, such as TorchScript) gives ``(None, note)`` so a report is never lost to Grad-CAM.
    """
    try:
        from ..baselines.gradcam import cam_maps
    except ImportError as exc:
        return None, f"Grad-CAM panel left out: medcam_fast.baselines.gradcam is not available ({exc})"
    try:
        maps = cam_maps(model, x, label, method=method)
    except Exception as exc:  # noqa: BLE001 - Grad-CAM is an extra; the report goes on without it
        return None, f"Grad-CAM panel left out: {method} failed on this model ({type(exc).__name__}: {exc})"
    if maps is None or tuple(maps.shape) != (x.shape[0], x.shape[2], x.shape[3]):
        got = None if maps is None else tuple(maps.shape)
        return None, f"Grad-CAM panel left out: cam_maps returned shape {got}, expected {(x.shape[0], *x.shape[2:])}"
    return maps.detach().float().cpu().clamp(0, 1), None

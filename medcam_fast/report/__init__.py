"""Reports of Med-CAM explanations: one PNG panel per image, ``report.html`` and ``results.json``.

    from medcam_fast import report
    rows = explanation.rows(class_names)                 # add "name" to each row
    png = report.panel_png("out/a.png", pre.to_unit(path), rows[0], explanation.mask[0],
                           pre.denormalise(explanation.evidence[0]).clamp(0, 1), gt_mask=None)
    report.write_report("out", rows, [png], class_names, "My run", notes=["..."])

Grad-CAM heat maps come from ``medcam_fast.baselines.gradcam.cam_maps`` when that module is there
(:func:`gradcam_maps`); without it the panel is left out and the reason is returned as a note.
"""
from __future__ import annotations

from .html import environment, write_report
from .panels import panel_png, panel_title
from .tables import REPORT_COLUMNS, SUMMARY_COLUMNS, blank_image_sentence, json_safe, text_table

__all__ = ["REPORT_COLUMNS", "SUMMARY_COLUMNS", "blank_image_sentence", "environment", "explain_to_report",
           "gradcam_maps", "json_safe", "panel_png", "panel_title", "text_table", "write_report"]


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


from .run import explain_to_report  # noqa: E402 - run.py uses gradcam_maps above

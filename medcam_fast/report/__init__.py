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

from .gradcam import gradcam_maps
from .html import environment, write_report
from .panels import panel_png, panel_title
from .run import explain_to_report
from .tables import REPORT_COLUMNS, SUMMARY_COLUMNS, blank_image_sentence, json_safe, text_table

__all__ = ["REPORT_COLUMNS", "SUMMARY_COLUMNS", "blank_image_sentence", "environment", "explain_to_report",
           "gradcam_maps", "json_safe", "panel_png", "panel_title", "text_table", "write_report"]

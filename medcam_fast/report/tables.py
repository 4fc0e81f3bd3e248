"""Plain-text summary tables and JSON-safe values for the report and the CLI."""
from __future__ import annotations

import math

__all__ = ["SUMMARY_COLUMNS", "REPORT_COLUMNS", "blank_image_sentence", "cell", "json_safe", "sided_columns",
           "text_table"]

# (key in the row dict, header)
SUMMARY_COLUMNS = [("name", "name"), ("class_name", "class"), ("prob_input", "p(x)"),
                   ("prob_evidence", "p(evidence)"), ("sufficient", "sufficient"), ("area", "area"),
                   ("a_star", "a*"), ("random_pass", "random_pass"), ("flipped_when_removed", "flipped_removed"),
                   ("prob_null", "p(blank)"), ("null_keeps_label", "blank_keeps"), ("status", "status"),
                   ("necessary_status", "necessary"), ("necessary_area", "nec_area"),
                   ("necessary_random_pass", "nec_random"), ("seconds", "seconds")]
REPORT_COLUMNS = [("name", "name"), ("label", "label"), ("class_name", "class name"),
                  ("prob_input", "p(label | x)"), ("prob_evidence", "p(label | evidence)"), ("kept_on_baseline", "kept on baseline"),
                  ("sufficient", "sufficient"), ("area", "area"), ("a_star", "a*"), ("random_pass", "random_pass"),
                  ("flipped_when_removed", "flipped when removed"), ("certified_fills", "certified fills"),
                  ("prob_null", "p(label | blank)"), ("null_keeps_label", "null_keeps_label"),
                  ("kept_robust", "kept_robust (audit)"), ("status", "status"),
                  ("necessary_status", "necessary side"), ("necessary_area", "necessary area"),
                  ("necessary_new_class_name", "call without it"),
                  ("necessary_random_pass", "random regions removed flip"), ("seconds", "seconds")]

_FORMATS = {"prob_input": ".3f", "prob_evidence": ".3f", "prob_null": ".3f", "kept_robust": ".2f",
            "area": ".3f", "a_star": ".3f", "random_pass": ".2f", "seconds": ".2f", "necessary_area": ".3f",
            "necessary_random_pass": ".2f"}


def cell(key: str, value) -> str:
    """One table cell as text: floats rounded per column, NaN as "n/a", bools as yes/no."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return format(value, _FORMATS.get(key, ".4g"))
    return str(value)


def text_table(rows: list[dict], columns=SUMMARY_COLUMNS) -> str:
    """A fixed-width table, one line per row, with a header and a rule (the necessary side's
    columns only when some row has that side)."""
    columns = sided_columns(rows, columns)
    header = [h for _, h in columns]
    body = [[cell(k, r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [k in _FORMATS for k, _ in columns]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def sided_columns(rows: list[dict], columns):
    """``columns`` without the necessary side's when no row has that side (a one-sided run)."""
    if any("necessary_status" in r for r in rows):
        return list(columns)
    return [c for c in columns if not c[0].startswith("necessary_")]


def blank_image_sentence(class_name: str) -> str:
    """What ``null_keeps_label`` means, in words: a finding about the classifier, not the image."""
    return (f"this classifier predicts {class_name} for a blank image (the baseline image with every pixel "
            f"removed), so keeping '{class_name}' on the evidence proves nothing about the evidence: "
            f"this is a finding about the classifier, not about this image")


def json_safe(value):
    """Recursively: NaN/Inf → None (JSON has no NaN), tuples → lists, tensors/numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

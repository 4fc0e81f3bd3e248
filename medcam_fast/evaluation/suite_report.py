"""The known-evidence suite's Markdown: each case's card section (oracle facts, clean accuracy,
recipe) and the one table of every method on every case."""
from __future__ import annotations

import math
import statistics

from ..zoo.cards import classifier_card_markdown

# the suite table's rows, in order: perturbation baselines, CAMs, Med-CAM's default (both sides)
# and its other two objectives (sufficient side only)
SUITE_METHODS = ("occlusion_blank", "occlusion_blur", "rise_blank", "rise_blur", "ig_blank", "ig_blur",
                 "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "ablationcam",
                 "medcam", "medcam_deletion", "medcam_dual")
BINARY_METHODS = ("medcam", "medcam_deletion", "medcam_dual")
ROW_NAMES = {"medcam": "Med-CAM default, sufficient side (preservation)",
             "medcam/necessary": "Med-CAM default, necessary side", "medcam_deletion": "Med-CAM deletion",
             "medcam_dual": "Med-CAM dual", "occlusion_blank": "occlusion, blank fill",
             "occlusion_blur": "occlusion, blur_fine fill", "rise_blank": "RISE, blank fill",
             "rise_blur": "RISE, blur_fine fill", "ig_blank": "integrated gradients, from blank",
             "ig_blur": "integrated gradients, from blur_fine"}


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}%"


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def oracle_line(o: dict) -> str:
    """One sentence of a case set's oracle facts (:meth:`OracleFacts.summary`)."""
    acts = " and ".join(o["acts_on"]) if o["acts_on"] else "neither side"
    return (f"flip rate {_pct(o.get('flip_rate'))}; the mark alone keeps the call on {_pct(o['sufficient_alone'])} "
            f"(random blobs of its area: {_pct(o['random_sufficient'])}); removing it flips the call on "
            f"{_pct(o['necessary'])} (random blobs: {_pct(o['random_necessary'])}); a fill is certified on "
            f"{_pct(o['testable'])}; the shortcut acts on: **{acts}**")


def case_card_markdown(card: dict) -> str:
    """The model card's Markdown with the case's known-evidence section appended."""
    text = classifier_card_markdown(card)
    ke = card.get("known_evidence")
    if not ke:
        return text
    acc = ke["clean_accuracy"]
    w, wo = acc["with_shortcut"], acc["same_recipe_without"]
    lines = ["", f"## Known-evidence case `{ke['case']}`", "",
             f"- **Recipe:** {ke['recipe']}" + (f" ({ke['note']})" if ke.get("note") else "") + ".",
             f"- **Mark:** {ke['shortcut']['description']}; {ke['shortcut']['area']:.2%} of the image on average, the "
             f"ground truth (grown by 2 px) {ke['shortcut']['ground_truth_area']:.2%}.",
             f"- **Clean test accuracy:** {w['accuracy']:.3f} (balanced {w['balanced_accuracy']:.3f}); the same "
             f"recipe without the shortcut ({acc['clean_recipe_card']}): {wo['accuracy']:.3f} (balanced "
             f"{wo['balanced_accuracy']:.3f}): {acc['difference_points']:+.1f} points "
             f"({acc['balanced_difference_points']:+.1f} balanced).",
             f"- **Cases:** {ke['cases_rule']}.",
             f"- **Oracle test:** {ke['oracle_test']}.", "",
             "| split | eligible | cases (flipped) | flip rate | mark alone keeps | random blobs keep | removing "
             "flips | random blobs flip | fill certified | acts on |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for split in ("val", "test"):
        c = ke["cases"][split]
        o = c["oracle"]
        lines.append(f"| {split} | {c['eligible']} | {c['cases']} | {_pct(c['flip_rate'])} | "
                     f"{_pct(o['sufficient_alone'])} | {_pct(o['random_sufficient'])} | {_pct(o['necessary'])} | "
                     f"{_pct(o['random_necessary'])} | {_pct(o['testable'])} | {', '.join(o['acts_on']) or '-'} |")
    b = ke["built"]
    lines += ["", f"Built on {b['machine']}, torch {b['torch']}, {b['date']}; oracle facts in {b['oracle_seconds']} s."]
    return text + "\n".join(lines) + "\n"


def _mean(values) -> float:
    v = [float(a) for a in values if a is not None and not (isinstance(a, float) and math.isnan(a))]
    return statistics.mean(v) if v else float("nan")


def method_row(records: list[dict]) -> dict:
    """Suite figures of one method on one case from its harness records; a two-sided Med-CAM's
    necessary side under ``"necessary"`` (the same figures, from its own ranking and mask)."""
    binary = records[0]["method"] in BINARY_METHODS
    statuses = [r.get("status") for r in records if r.get("status")]
    row = {
        "n": len(records),
        "hit": _mean(r["hit"] for r in records),
        "precision_at_gt_area": _mean(r["precision_at_gt_area"] for r in records),
        "lesion_hit": _mean(r.get("lesion_hit") for r in records),
        "lesion_precision_at_area": _mean(r.get("lesion_precision_at_area") for r in records),
        "mask_precision": _mean(r["precision"] for r in records) if binary else None,
        "area": _mean(r["area"] for r in records) if binary else None,
        "ok": statuses.count("ok") / len(statuses) if statuses else None,
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))} if statuses else None,
        "random_pass": _mean(r.get("mc_random_pass") for r in records) if binary else None,
        "passes": _mean(r.get("passes") for r in records),
        "seconds": _mean(r["seconds"] for r in records),
    }
    if all("necessary_status" in r for r in records):
        nec = [r["necessary_status"] for r in records]
        row["necessary"] = {
            **row, "hit": _mean(r["necessary_hit"] for r in records),
            "precision_at_gt_area": _mean(r["necessary_precision_at_gt_area"] for r in records),
            "lesion_hit": _mean(r.get("necessary_lesion_hit") for r in records),
            "lesion_precision_at_area": float("nan"),
            "mask_precision": _mean(r["necessary_precision"] for r in records),
            "area": _mean(r["necessary_area"] for r in records), "ok": nec.count("ok") / len(nec),
            "statuses": {s: nec.count(s) for s in sorted(set(nec))},
            "random_pass": _mean(r["necessary_random_pass"] for r in records)}
    return row


def suite_table(rows: dict[str, dict[str, dict]]) -> str:
    """``rows[case][method]`` (:func:`method_row`) as one Markdown table, cases in order."""
    head = ("| case | method | hit | precision at GT area | lesion hit | lesion precision | mask precision | "
            "mask area | status ok | random_pass | passes / image | s / image |")
    lines = [head, "|---|---|" + "---:|" * 10]
    for case, methods in rows.items():
        sided = [(m, methods.get(m)) for m in SUITE_METHODS]
        sided = [pair for m, r in sided if r is not None
                 for pair in [(m, r)] + ([(m + "/necessary", r["necessary"])] if "necessary" in r else [])]
        for m, r in sided:
            name = ROW_NAMES.get(m, m)
            lines.append(f"| {case} | {name} | {_pct(r['hit'])} | {_num(r['precision_at_gt_area'])} | "
                         f"{_pct(r['lesion_hit'])} | {_num(r['lesion_precision_at_area'])} | "
                         f"{_num(r['mask_precision'])} | {_pct(r['area'])} | {_pct(r['ok'])} | "
                         f"{_num(r['random_pass'])} | {_num(r['passes'], '{:.0f}')} | {_num(r['seconds'])} |")
    return "\n".join(lines)


__all__ = ["BINARY_METHODS", "ROW_NAMES", "SUITE_METHODS", "case_card_markdown", "method_row", "oracle_line",
           "suite_table"]

"""Per-method summaries of evaluation records, the markdown/JSON report, and its figures."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .sufficiency import SWEEP

COLUMNS = [  # (key, header, format)
    ("n", "images", "{:d}"), ("kept", "kept", "{:.1%}"), ("prob_change", "Δp(y)", "{:+.3f}"),
    ("area", "area", "{:.1%}"), ("deletion_auc", "deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "insertion AUC ↑", "{:.3f}"), ("road", "ROAD ↑", "{:.3f}"), ("hit", "hit rate", "{:.1%}"),
    ("iou", "IoU", "{:.3f}"), ("seconds", "s / image", "{:.2f}"),
    ("null_keeps_label", "blank keeps label", "{:.1%}"), ("sufficient", "sufficient", "{:.1%}"),
    ("flipped_when_removed", "flipped when removed", "{:.1%}"), ("random_pass", "random_pass", "{:.2f}"),
    ("degenerate", "degenerate", "{:.1%}"), ("sufficient_at_medcam_area", "sufficient @ Med-CAM area", "{:.1%}"),
    ("area_to_sufficiency", "a* (area to sufficiency)", "{:.1%}"), ("judge_kept", "judge kept", "{:.1%}"),
    ("status_ok", "status ok", "{:.1%}"), ("kept_robust", "kept_robust (audit)", "{:.2f}"),
]
# the known-evidence table: ground truth is the planted tag; the random blob control at each
# method's own area beside every sufficiency column
TAG_COLUMNS = [
    ("n", "images", "{:d}"), ("hit", "hit (max on tag)", "{:.1%}"), ("precision", "mask precision", "{:.1%}"),
    ("recall", "tag recall", "{:.1%}"), ("area", "area", "{:.1%}"), ("kept", "kept", "{:.1%}"),
    ("sufficient", "sufficient", "{:.1%}"), ("random_pass", "random_pass", "{:.2f}"),
    ("flipped_when_removed", "flipped when removed", "{:.1%}"), ("area_to_sufficiency", "a*", "{:.1%}"),
    ("precision_at_a_star", "precision @ a*", "{:.1%}"), ("status_ok", "status ok", "{:.1%}"),
    ("judge_kept", "judge kept", "{:.1%}"), ("blob_kept", "blob @ area: kept (blank)", "{:.1%}"),
    ("blob_judge_kept", "blob: judge kept", "{:.1%}"), ("kept_robust", "kept_robust (audit)", "{:.2f}"),
    ("lesion_hit", "lesion hit", "{:.1%}"), ("seconds", "s / image", "{:.2f}"),
]
SUMMARY_KEYS = list(dict.fromkeys([k for k, _, _ in COLUMNS[1:] + TAG_COLUMNS[1:]] + ["lesion_iou"]))


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per method: the mean of every column (bools as rates; NaNs, e.g. IoU on empty masks, skipped)."""
    by = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    out = {}
    for method, rs in by.items():
        row = {"n": len(rs)}
        for key in SUMMARY_KEYS:
            row[key] = _mean(r.get(key) for r in rs)
        row["status_ok"] = _mean(r["status"] == "ok" for r in rs if "status" in r)
        row["curve"] = [_mean(r["evidence_curve"][i] for r in rs) for i in range(len(SWEEP))]
        statuses = [r["status"] for r in rs if "status" in r]
        if statuses:
            row["status"] = {s: statuses.count(s) for s in sorted(set(statuses))}
            ok = [r for r in rs if r.get("status") == "ok"]
            row["ok_max_random_pass"] = max((r["mc_random_pass"] for r in ok), default=float("nan"))
            row["ok_mean_area"] = _mean(r["area"] for r in ok)
        out[method] = row
    return out


def markdown_table(summary: dict[str, dict], columns=None) -> str:
    """One row per method (Med-CAM first, the trivial controls last) over ``columns`` (default COLUMNS)."""
    columns = columns or COLUMNS
    controls = [m for m in ("ground_truth", "all_zero", "all_one") if m in summary]
    from .runner import MEDCAM_METHODS

    order = (list(MEDCAM_METHODS) + sorted(m for m in summary if m not in MEDCAM_METHODS and m not in controls)
             + controls)
    lines = ["| method | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for m in [m for m in order if m in summary]:
        row = summary[m]
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(summary: dict[str, dict]) -> str:
    lines = ["| method | " + " | ".join(f"{a:.1%}" for a in SWEEP) + " |", "|---|" + "---:|" * len(SWEEP)]
    for m, row in sorted(summary.items()):
        lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in row["curve"]) + " |")
    return "\n".join(lines)


def figures(records: list[dict], summary: dict[str, dict], out_dir: Path) -> list[str]:
    """Box plots of area and IoU per method, and the evidence curve (worst-case p(label) under the
    certified fills against area). Returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ["medcam", "medcam_plain", "medcam_reference"] + sorted(summary) if m in summary]
    methods = list(dict.fromkeys(methods))
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("area", "iou")):
        data = [[r[key] for r in records if r["method"] == m and r.get(key) == r.get(key)] for m in methods]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(out_dir / "boxplots.png", dpi=110)
    plt.close(fig)
    names.append("boxplots.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ax.plot([a * 100 for a in SWEEP], summary[m]["curve"], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("area of the top-k pixels (%)")
    ax.set_ylabel("p(label), worst certified fill")
    ax.set_title("evidence curve")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "evidence_curve.png", dpi=110)
    plt.close(fig)
    names.append("evidence_curve.png")
    return names


def write_evaluation_report(records: list[dict], out_dir, title: str, facts: list[str], extra_sections=(),
                 extra_figures=(), known_evidence: bool = False) -> dict:
    """Writes ``results.md``, ``results.json`` and the figures (plus ``extra_figures``, file names
    already in ``out_dir``); returns the summary. ``known_evidence``: the ground truth is a planted
    tag, and the TAG_COLUMNS table comes first."""
    out_dir = Path(out_dir)
    summary = summarise(records)
    figs = list(extra_figures) + figures(records, summary, out_dir)
    md = [f"# {title}", ""] + [f"- {f}" for f in facts] + [""]
    if known_evidence:
        md += ["## Known evidence: the planted tag", "", markdown_table(summary, TAG_COLUMNS), ""]
    md += ["## Per method", "", markdown_table(summary), "",
          "## Evidence curve: p(label) of each map's top-k pixels, worst certified fill", "",
          curve_table(summary), ""]
    if "medcam" in summary and "status" in summary["medcam"]:
        md += ["## Med-CAM status", "", ", ".join(f"{k}: {v}" for k, v in summary["medcam"]["status"].items()), ""]
    for heading, body in extra_sections:
        md += [f"## {heading}", "", body, ""]
    md += ["## Figures", ""] + [f"![{f}]({f})" for f in figs]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"title": title, "facts": facts, "summary": summary},
                                                     indent=2) + "\n")
    return summary

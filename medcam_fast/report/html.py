"""``report.html`` (one self-contained page: a table, findings, the panels) and ``results.json``.

The page has no scripts, no stylesheets or fonts from elsewhere and only relative links (the panel
PNGs beside it), so the output folder can be moved, zipped or opened offline. Every piece of text
(file names, class names, notes, reasons) is HTML-escaped.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from html import escape
from pathlib import Path

from ..runstate import atomic_write
from .tables import REPORT_COLUMNS, blank_image_sentence, cell, json_safe, sided_columns

__all__ = ["environment", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fff1f0; } tr.warn td { background: #fffbe6; }
.finding { background: #fffbe6; border-left: 4px solid #f5a623; padding: 0.4em 0.8em; margin: 0.4em 0; }
.failure { background: #fff1f0; border-left: 4px solid #d0021b; padding: 0.4em 0.8em; margin: 0.4em 0; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; } .small { font-size: 0.8em; color: #555; }
"""
_NUMERIC = {"label", "prob_input", "prob_evidence", "kept_robust", "area", "a_star", "random_pass", "prob_null",
            "seconds"}


def environment() -> dict:
    """Versions and build facts recorded with every report."""
    import torch

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "onnxruntime", "numpy", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            out[name] = None
    try:
        from .._ext import build_info
        from .._version import __version__

        out["medcam_fast"] = __version__
        out["build_info"] = build_info()
    except Exception as exc:  # noqa: BLE001
        out["build_info"] = {"error": str(exc)}
    out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return out


def _rel(path, out_dir: Path) -> str:
    rel = os.path.relpath(Path(path).resolve(), out_dir.resolve())
    return Path(rel).as_posix()


def _row_class(row: dict) -> str:
    if not row.get("kept_on_baseline", True):
        return "bad"
    return "warn" if row.get("status", "ok") != "ok" else ""


def _blank_findings(rows: list[dict]) -> list[str]:
    seen, out = set(), []
    for r in rows:
        if r.get("null_keeps_label"):
            cls = str(r.get("class_name", r.get("label")))
            if cls not in seen:
                seen.add(cls)
                out.append(blank_image_sentence(cls))
    return out


def write_report(out_dir, rows: list[dict], panels: list, class_names, title: str = "Med-CAM report",
                 notes: list[str] | None = None, metadata: dict | None = None,
                 failures: list[dict] | None = None) -> tuple[str, str]:
    """Writes ``out_dir/report.html`` and ``out_dir/results.json`` (each atomically: a reader or a
    crash sees the old file or the new one); returns their paths.

    Args:
        out_dir: the output folder (made if missing); panels should sit inside it.
        rows: one dict per image, as ``Explanation.rows(class_names)`` plus ``name`` (and optionally
            ``path``, ``true_class``, ``reason``).
        panels: the PNG of each row (same order; None where there is none). Linked relatively.
        class_names: the classifier's class names.
        title: the page title.
        notes: sentences shown above the table (what was run, what was left out and why).
        metadata: extra facts for results.json (config, model, command, ...); versions and
            ``build_info`` are added.
        failures: ``{"path", "error"}`` per input that could not be explained; listed in both files.

    When a row's ``null_keeps_label`` is true the page says in words that the classifier predicts
    that class for a blank image.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    failures = list(failures or [])
    if len(panels) != len(rows):
        raise ValueError(f"{len(panels)} panels for {len(rows)} rows")
    rel_panels = [_rel(p, out_dir) if p else None for p in panels]
    findings = _blank_findings(rows)

    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>{escape(title)}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    h.append(f'<p class="small">classes: {escape(", ".join(map(str, class_names)))} &middot; '
             f"{len(rows)} image(s) explained, {len(failures)} failed &middot; written "
             f"{escape(_dt.datetime.now().isoformat(timespec='seconds'))}</p>")
    for n in notes:
        h.append(f"<p>{escape(str(n))}</p>")
    if findings:
        h.append("<h2>Findings about the classifier</h2>")
        h.extend(f'<p class="finding">{escape(s)}.</p>' for s in findings)
    if failures:
        h.append("<h2>Failures</h2>")
        h.extend(f'<p class="failure">{escape(str(f.get("path")))}: {escape(str(f.get("error")))}</p>'
                 for f in failures)

    h.append("<h2>Summary</h2><table><thead><tr>")
    columns = sided_columns(rows, REPORT_COLUMNS)
    h.extend(f"<th>{escape(head)}</th>" for _, head in columns)
    h.append("</tr></thead><tbody>")
    for r in rows:
        cls = _row_class(r)
        h.append(f'<tr class="{cls}">' if cls else "<tr>")
        for key, _ in columns:
            value = r.get(key)
            text = escape(cell(key, value))
            h.append(f'<td class="num">{text}</td>' if key in _NUMERIC else f"<td>{text}</td>")
        h.append("</tr>")
    h.append("</tbody></table>")
    h.append('<p class="small">p(label | evidence): the classifier on m*x + (1-m)*baseline. kept: its top-1 is '
             "still the label. certified fills: the fills of the removed pixels (blank, blurred copies of the "
             "image, its mean) that do not give the label on their own, for this image. sufficient: the label "
             "kept, by a margin, with the removed pixels taken from every certified fill. a*: the smallest area "
             "at which the ranking's top pixels are sufficient (the evidence curve in each panel). random_pass: "
             "the share of random blobs of the mask's area that pass the same test (status ok needs at most "
             "20%; n/a where the mask did not pass, since the adaptive checks then draw none). flipped when removed: the label lost with the mask's pixels filled instead. area: fraction "
             "of pixels kept. p(label | blank): the classifier on the baseline image alone. kept_robust: an "
             "audit, pasted onto other images (n/a unless asked for). The necessary side (when computed): the "
             "smallest region whose removal, under every certified fill, changes the call; random regions "
             "removed flip: the share of random regions of its area that change the call too (ok needs at most "
             "20%).</p>")

    h.append("<h2>Panels</h2>")
    for r, src in zip(rows, rel_panels):
        h.append("<figure>")
        if src:
            h.append(f'<img src="{escape(src)}" alt="{escape(str(r.get("name", "")))}">')
        caption = [f"<b>{escape(str(r.get('name', '')))}</b>: {escape(str(r.get('class_name', '')))}, "
                   f"status {escape(str(r.get('status', '')))}"]
        if r.get("headline"):
            caption.append(f"<br><b>{escape(str(r['headline']))}</b>")
        if r.get("reason"):
            caption.append(f"<br>kept alone: {escape(str(r['reason']))}")
        if r.get("necessary_reason"):
            caption.append(f"<br>removed: {escape(str(r['necessary_reason']))}")
        if r.get("null_keeps_label"):
            caption.append(f"<br>{escape(blank_image_sentence(str(r.get('class_name', r.get('label')))))}.")
        h.append(f"<figcaption>{''.join(caption)}</figcaption></figure>")
    h.append("</body></html>")

    html_path = atomic_write(out_dir / "report.html", "\n".join(h) + "\n")

    results = {
        "title": title,
        "class_names": list(map(str, class_names)),
        "notes": notes,
        "findings": findings,
        "rows": [{**r, "panel": src} for r, src in zip(rows, rel_panels)],
        "failures": failures,
        "metadata": {**(metadata or {}), "environment": environment()},
    }
    text = json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"
    json_path = atomic_write(out_dir / "results.json", text)
    return str(html_path), str(json_path)

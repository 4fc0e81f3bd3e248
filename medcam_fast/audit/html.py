"""One self-contained HTML page of a shortcut audit (:func:`medcam_fast.audit.audit`).

Every picture is a PNG inlined as base64 (Pillow), there are no scripts and nothing is fetched from
elsewhere, so the page can be mailed or opened offline. Every piece of text (title, notes, class
names, ids, reasons) is HTML-escaped.
"""
from __future__ import annotations

import base64
import io
import math
import os
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from .analysis import AuditResult, Cluster

__all__ = ["write_audit_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; vertical-align: middle; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cluster { border-left: 4px solid #bbb; padding: 0.2em 0.8em; margin: 1em 0; }
.cluster.flagged { border-left-color: #d0021b; background: #fff6f5; }
.reason { margin: 0.3em 0; } .small { font-size: 0.8em; color: #555; }
figure { display: inline-block; margin: 0.3em; text-align: center; }
figcaption { font-size: 0.8em; color: #444; max-width: 10em; overflow-wrap: anywhere; }
img { image-rendering: pixelated; border: 1px solid #ddd; }
"""
_SIZE = 128  # displayed width of every picture, in pixels


def _png(rgb: np.ndarray, alt: str) -> str:
    """An ``<img>`` tag holding ``rgb`` ``[H,W,3]`` uint8 as an inlined PNG, scaled up to ``_SIZE`` wide."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if img.width < _SIZE:  # small maps are scaled up with hard edges so that pixels stay pixels
        img = img.resize((_SIZE, max(1, round(img.height * _SIZE / img.width))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{_SIZE}" alt="{escape(alt)}">'


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    top = float(m.max()) if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


def _heat(m: np.ndarray) -> np.ndarray:
    """``[H,W]`` >= 0 as ``[H,W,3]`` uint8: black, red, yellow, white with rising evidence."""
    t = _unit(m)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (255 * rgb).round().astype(np.uint8)


def _overlay(image: np.ndarray | None, m: np.ndarray) -> np.ndarray:
    """The image ``[h,w,3]`` uint8 (dark grey where None) with the evidence ``[H,W]`` laid over in red."""
    t = _unit(m)
    if image is None:
        base = np.full(t.shape + (3,), 40.0)
    else:
        base = image.astype(np.float64)
        if base.shape[:2] != t.shape:  # the map resampled onto the thumbnail
            t = np.asarray(Image.fromarray(t.astype(np.float32), "F").resize(
                (base.shape[1], base.shape[0]), Image.BILINEAR), dtype=np.float64).clip(0, 1)
    a = 0.65 * t[..., None]
    return (base * (1 - a) + a * np.array([255.0, 0.0, 0.0])).round().clip(0, 255).astype(np.uint8)


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.0%}"


def _examples(result: AuditResult, cl: Cluster, k: int) -> np.ndarray:
    """Up to ``k`` members, the most typical first (closest evidence to the cluster's mean map)."""
    members = np.asarray(cl.members)
    if result.maps is None or len(members) <= 1:
        return members[:k]
    target = cl.mean_map / cl.mean_map.sum() if cl.mean_map.sum() > 0 else cl.mean_map
    dist = []
    for i in members:
        m = np.asarray(result.maps[i], dtype=np.float64)
        dist.append(np.abs((m / m.sum() if m.sum() > 0 else m) - target).sum())
    return members[np.argsort(dist, kind="stable")[:k]]


def _check(result: AuditResult, images, ids) -> tuple[np.ndarray | None, list[str]]:
    n = len(result.in_lesion)
    if images is not None:
        images = np.asarray(images)
        if images.ndim == 3:  # grey thumbnails are accepted too
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be [N={n},H,W,3] uint8, got shape {images.shape} dtype {images.dtype}")
    if ids is None:
        ids = [f"image {i}" for i in range(n)]
    elif len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    return images, [str(s) for s in ids]


def write_audit_html(path, result: AuditResult, images: np.ndarray | None = None, ids: list[str] | None = None,
                     title: str = "Shortcut audit", notes: list[str] | None = None, max_examples: int = 6) -> Path:
    """Writes the audit as one self-contained HTML page at ``path`` (atomically) and returns it.

    Args:
        path: the page to write; its folder is made if missing.
        result: :func:`medcam_fast.audit.audit`'s result.
        images: ``[N,H,W,3]`` uint8 thumbnails (or ``[N,H,W]`` grey), or None (evidence over dark grey).
        ids: one name per image (default ``"image i"``), shown under the example panels.
        title: the page title. notes: sentences shown under it (what was audited, how).
        max_examples: example panels per cluster (the members closest to the cluster's mean map;
            they need ``result.maps``, else only the ids are listed).
    """
    images, ids = _check(result, images, ids)
    names = [str(s) for s in result.class_names]
    flagged = result.flagged()
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
         f"<style>{_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
         f'<p class="small">{len(result.in_lesion)} image(s), {len(names)} class(es), {len(result.clusters)} '
         f"cluster(s), {len(flagged)} flagged as a likely shortcut.</p>"]
    h.extend(f"<p>{escape(str(s))}</p>" for s in notes or [])
    if flagged:
        h.append("<h2>Flagged</h2><ul>")
        h.extend(f"<li><b>{escape(names[c.class_index])}</b>, {len(c.members)} image(s): {escape(c.reason)}</li>"
                 for c in flagged)
        h.append("</ul>")
    else:
        h.append("<p>No cluster flagged.</p>")

    h.append("<h2>Where the evidence lies, per class</h2><table><thead><tr><th>class</th><th>images</th>"
             "<th>with an in-lesion share</th><th>mean in-lesion share</th><th>clusters</th><th>flagged</th>"
             "<th>mean evidence map</th></tr></thead><tbody>")
    for k, name in enumerate(names):
        in_class = [c for c in result.clusters if c.class_index == k]
        members = np.concatenate([np.asarray(c.members, dtype=np.int64) for c in in_class] or [np.zeros(0, int)])
        known = int(np.sum(~np.isnan(np.asarray(result.in_lesion, dtype=np.float64)[members])))
        heat = _png(_heat(result.mean_maps[k]), f"mean evidence of {name}") if result.counts[k] else "no image"
        h.append(f"<tr><td>{escape(name)}</td><td class=\"num\">{int(result.counts[k])}</td>"
                 f"<td class=\"num\">{known}</td><td class=\"num\">{_pct(result.class_in_lesion[k])}</td>"
                 f"<td class=\"num\">{len(in_class)}</td><td class=\"num\">{sum(c.flagged for c in in_class)}</td>"
                 f"<td>{heat}</td></tr>")
    h.append("</tbody></table>")
    h.append('<p class="small">in-lesion share: the share of an image\'s evidence inside its lesion mask '
             "(images without a lesion left out). Mean evidence maps: black (none) to white (most).</p>")

    h.append("<h2>Clusters (flagged first)</h2>")
    number, seen = {}, {}
    for c in result.clusters:  # the cluster's number within its class, in audit order
        seen[c.class_index] = seen.get(c.class_index, 0) + 1
        number[id(c)] = seen[c.class_index]
    for c in sorted(result.clusters, key=lambda c: not c.flagged):
        name = names[c.class_index]
        mark = " &middot; <b>flagged</b>" if c.flagged else ""
        h.append(f'<div class="cluster{" flagged" if c.flagged else ""}">'
                 f"<h3>{escape(name)}, cluster {number[id(c)]}{mark}</h3>"
                 f"<table><tr><th>images</th><th>in-lesion share</th><th>concentration</th></tr>"
                 f'<tr><td class="num">{len(c.members)}</td><td class="num">{_pct(c.in_lesion)}</td>'
                 f'<td class="num">{_pct(c.concentration)}</td></tr></table>'
                 f'<p class="reason">{escape(c.reason)}</p>'
                 f"<figure>{_png(_heat(c.mean_map), f'mean evidence of the cluster of {name}')}"
                 "<figcaption>mean evidence map</figcaption></figure>")
        shown = _examples(result, c, max(0, int(max_examples)))
        for i in shown:
            if result.maps is not None:
                panel = _overlay(None if images is None else images[i], result.maps[i])
            elif images is not None:
                panel = images[i]
            else:
                continue
            h.append(f"<figure>{_png(panel, ids[i])}<figcaption>{escape(ids[i])}</figcaption></figure>")
        if len(shown) and result.maps is None and images is None:
            h.append(f'<p class="small">examples: {escape(", ".join(ids[i] for i in shown))}</p>')
        h.append("</div>")
    h.append('<p class="small">concentration: the share of the cluster\'s mean evidence in its top 5% pixels '
             "(100%: all in one small place). Example panels: the image with its evidence in red.</p>")
    h.append("</body></html>")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text("\n".join(h) + "\n", encoding="utf-8")
    os.replace(part, path)  # readers never see a half-written page
    return path

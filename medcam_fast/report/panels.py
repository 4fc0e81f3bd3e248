"""One PNG per explained image (matplotlib, Agg backend, never a window).

Panels, left to right:

(a) the image as the classifier sees it (after resizing, before normalisation);
(b) the Med-CAM binary mask drawn as a contour line over the image (never filled, so the pixels under
    it stay visible), and the necessary side's region dashed in magenta when the row has one;
(c) the evidence ``m*x + (1-m)*baseline``: what the classifier was shown when the label was checked.
    Removed pixels carry the baseline value (``MedCAMConfig.baseline``, 0 in the model's normalised
    input space); shown back in image units they are the intensity that value maps to (with the
    usual ``(x-mean)/std`` normalisation and baseline 0: the normalisation mean, a flat grey; with
    mean 0 / std 1: black). ``evidence_caption`` says which;
(d) the ground-truth lesion outline (and the Med-CAM outline, dashed, for comparison), when known;
(e) a Grad-CAM heat map over the image, when given;
(f) the evidence curve, when the row has one: p(label) of the ranking's top pixels against area,
    under the worst certified fill, with a* and the mask's own area marked.

The numbers (class, p(label|x), p(label|evidence), sufficient, a*, random_pass, flipped when
removed, area, status, seconds; the necessary side's status, area and random control) and the
headline sentence go in the figure title.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

MASK_COLOUR = "#00e5ff"     # Med-CAM outline: cyan
NECESSARY_COLOUR = "#ff00d4"  # the necessary side's outline: magenta, dashed
GT_COLOUR = "#ff3b30"       # ground truth outline: red
LINE_WIDTH = 1.6

__all__ = ["panel_png", "panel_title", "GT_COLOUR", "MASK_COLOUR", "NECESSARY_COLOUR"]


def _np(a) -> np.ndarray:
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a)


def _display(image) -> tuple[np.ndarray, str | None]:
    """``[C,H,W]`` (C = 1 or 3) or ``[H,W]`` in [0,1] → an array imshow takes and its colour map."""
    a = _np(image).astype(np.float32)
    if a.ndim == 3:
        if a.shape[0] == 1:
            a = a[0]
        elif a.shape[0] == 3:
            a = np.transpose(a, (1, 2, 0))
        else:
            raise ValueError(f"image must be [1,H,W], [3,H,W] or [H,W], got shape {a.shape}")
    elif a.ndim != 2:
        raise ValueError(f"image must be [1,H,W], [3,H,W] or [H,W], got shape {a.shape}")
    a = np.clip(np.nan_to_num(a), 0.0, 1.0)
    return a, ("gray" if a.ndim == 2 else None)


def _bool_map(mask, hw: tuple[int, int], what: str) -> np.ndarray:
    m = _np(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != hw:
        raise ValueError(f"{what} must be [H,W] = {hw} like the image, got shape {m.shape}")
    return m.astype(bool)


def _outline(ax, mask: np.ndarray, colour: str, style: str = "solid") -> bool:
    """Draws the 0.5 level of ``mask`` as a line (padded so a mask touching the border or covering the
    whole image still gets a closed outline). Returns False for an empty mask (nothing to draw)."""
    if not mask.any():
        return False
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    ys, xs = np.arange(-1, h + 1), np.arange(-1, w + 1)
    ax.contour(xs, ys, padded, levels=[0.5], colors=[colour], linewidths=LINE_WIDTH, linestyles=style)
    return True


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def panel_title(row: dict, title: str = "") -> str:
    """The figure title: the image's name and the explanation's numbers, two lines."""
    cls = row.get("class_name", row.get("label", "?"))
    head = f"{title}  -  " if title else ""
    true = row.get("true_class")
    truth = f" (true: {true})" if true not in (None, "") else ""
    line1 = (f"{head}explained class: {cls} [{row.get('label', '?')}]{truth}   "
             f"p(label|x) = {_fmt(row.get('prob_input'))}   p(label|evidence) = {_fmt(row.get('prob_evidence'))}")
    a_star = row.get("a_star")
    line2 = (f"kept: {_fmt(row.get('kept_on_baseline'))}   sufficient: {_fmt(row.get('sufficient'))}   "
             f"area: {_fmt(100 * row['area'] if isinstance(row.get('area'), float) else None, '.1f')}%   "
             f"a*: {_fmt(100 * a_star if isinstance(a_star, float) else None, '.1f')}%   "
             f"random_pass: {_fmt(row.get('random_pass'), '.2f')}   "
             f"flipped when removed: {_fmt(row.get('flipped_when_removed'))}   "
             f"status: {row.get('status', '?')}   {_fmt(row.get('seconds'), '.2f')} s")
    if row.get("null_keeps_label"):
        line2 += f"   [the classifier gives {cls} for a blank image]"
    lines = [line1, line2]
    if row.get("necessary_status"):
        lines.append(f"necessary side: {row['necessary_status']}   area: "
                     f"{_fmt(100 * row['necessary_area'], '.1f')}%   call without it: "
                     f"{row.get('necessary_new_class_name', '?')}   random regions removed: "
                     f"{_fmt(row.get('necessary_random_pass'), '.2f')}")
    if row.get("headline"):
        lines.extend(textwrap.wrap(row["headline"], 170))
    return "\n".join(lines)


def panel_png(path, image_unit, row: dict, mask, evidence_unit, gt_mask=None, gradcam=None, title: str = "",
              evidence_caption: str = "evidence m*x (removed = baseline)", dpi: int = 110,
              necessary_mask=None) -> str:
    """Writes one PNG summarising one explained image; returns its path.

    Args:
        path: the PNG to write (parent folders are made).
        image_unit: ``[C,H,W]`` (C = 1 or 3) or ``[H,W]``, in [0,1]: the image at the model's input size,
            before normalisation (e.g. ``Preprocess.to_unit``).
        row: one of ``Explanation.rows(class_names)`` (optionally with ``true_class``): its numbers
            go in the title.
        mask: bool ``[H,W]``, the Med-CAM mask, drawn as an outline.
        evidence_unit: ``[C,H,W]`` in [0,1], the evidence in image units (e.g.
            ``Preprocess.denormalise(explanation.evidence[i])``): removed pixels show the baseline.
        gt_mask: bool ``[H,W]`` ground-truth lesion, or None (panel left out).
        gradcam: float ``[H,W]`` in [0,1], or None (panel left out).
        title: e.g. the image's name; shown before the numbers.
        evidence_caption: the evidence panel's caption (say what removed pixels look like).
        necessary_mask: bool ``[H,W]``, the necessary side's region (drawn dashed on panel (b)), or None.
    """
    # the Agg canvas directly, no pyplot: no global backend switch, no window, no figure registry
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img, cmap = _display(image_unit)
    hw = img.shape[:2]
    m = _bool_map(mask, hw, "mask")
    ev, ev_cmap = _display(evidence_unit)
    if ev.shape[:2] != hw:
        raise ValueError(f"evidence must have the image's size {hw}, got {ev.shape[:2]}")
    gt = _bool_map(gt_mask, hw, "gt_mask") if gt_mask is not None else None
    nec = _bool_map(necessary_mask, hw, "necessary_mask") if necessary_mask is not None else None
    cam = None
    if gradcam is not None:
        cam = _np(gradcam).astype(np.float32)
        if cam.ndim == 3 and cam.shape[0] == 1:
            cam = cam[0]
        if cam.shape != hw:
            raise ValueError(f"gradcam must be [H,W] = {hw}, got shape {cam.shape}")
        cam = np.clip(np.nan_to_num(cam), 0.0, 1.0)

    curve = [v if v is not None else float("nan") for v in row.get("evidence_curve") or []]
    curve_areas = list(row.get("curve_areas") or [])
    has_curve = bool(curve) and len(curve) == len(curve_areas) and any(v == v for v in curve)
    n = 3 + (gt is not None) + (cam is not None) + has_curve
    title_lines = panel_title(row, title).count("\n") + 1
    fig = Figure(figsize=(2.6 * n, 3.35 + 0.15 * max(0, title_lines - 2)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    kw = dict(vmin=0.0, vmax=1.0, interpolation="nearest")

    axes[0].imshow(img, cmap=cmap, **kw)
    axes[0].set_title("image", fontsize=8)

    axes[1].imshow(img, cmap=cmap, **kw)
    drawn = _outline(axes[1], m, MASK_COLOUR)
    area = float(m.mean())
    title_b = f"Med-CAM mask outline ({100 * area:.1f}%)" if drawn else "Med-CAM mask: empty"
    if nec is not None and _outline(axes[1], nec, NECESSARY_COLOUR, style="dashed"):
        title_b = f"kept alone: cyan ({100 * area:.1f}%)\nremoved flips: magenta ({100 * float(nec.mean()):.1f}%)"
    axes[1].set_title(title_b, fontsize=8)

    axes[2].imshow(ev, cmap=ev_cmap, **kw)
    axes[2].set_title(evidence_caption, fontsize=8)

    k = 3
    if gt is not None:
        axes[k].imshow(img, cmap=cmap, **kw)
        has_gt = _outline(axes[k], gt, GT_COLOUR)
        _outline(axes[k], m, MASK_COLOUR, style="dashed")
        inside = float((m & gt).sum() / m.sum()) if m.any() else float("nan")
        axes[k].set_title(("ground truth (red), mask (dashed)\n" if has_gt else "ground truth: empty mask\n")
                          + f"mask inside GT: {_fmt(100 * inside, '.0f')}%", fontsize=8)
        k += 1
    if cam is not None:
        axes[k].imshow(img, cmap=cmap, **kw)
        axes[k].imshow(cam, cmap="jet", alpha=0.45, **kw)
        _outline(axes[k], m, "white")
        axes[k].set_title("Grad-CAM (mask outline white)", fontsize=8)
        k += 1
    if has_curve:
        ax = axes[k]
        ax.plot([100 * a for a in curve_areas], curve, marker=".", color="#333")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xticks([0.5, 2, 10, 50])
        ax.set_xticklabels(["0.5", "2", "10", "50"], fontsize=6)
        ax.set_yticks([0, 0.5, 1])
        ax.set_yticklabels(["0", "0.5", "1"], fontsize=6)
        ax.axvline(100 * area, color=MASK_COLOUR, lw=1.2)
        a_star = row.get("a_star")
        if isinstance(a_star, float) and a_star == a_star:
            ax.axvline(100 * a_star, color="#333", ls="--", lw=0.8)
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_title(f"evidence curve: p(label), worst certified fill\nagainst area {100 * curve_areas[0]:g}-"
                     f"{100 * curve_areas[-1]:g}% (log; a* dashed, mask cyan)", fontsize=7)
        ax.set_box_aspect(1)

    fig.suptitle(panel_title(row, title), fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.74 - 0.04 * max(0, title_lines - 2), wspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)

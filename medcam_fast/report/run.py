"""The pipeline behind ``medcam-fast demo`` / ``explain``: inputs -> one Explainer per batch ->
panels -> report."""
from __future__ import annotations

from . import gradcam_maps
from .html import write_report
from .panels import panel_png
from .tables import blank_image_sentence, text_table

class _Progress:
    """A tqdm bar over the stages (a silent stand-in when tqdm is missing)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def stage(self, name: str):
        if self.bar is not None:
            self.bar.set_description(name)

    def set_total(self, total: int):
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _gt_at(mask, size):
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype("float32"))[None, None]
    return (F.interpolate(m, size=tuple(size), mode="area")[0, 0] >= 0.5).numpy()


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "image"


def _evidence_caption(pre, baseline: float) -> str:
    vals = [m + baseline * s for m, s in zip(pre.mean, pre.std)]
    grey = ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in dict.fromkeys(round(v, 2) for v in vals))
    return f"evidence m*x; removed = baseline\n({baseline:g} in model input = intensity {grey})"


def explain_to_report(loaded, items, failures, out_dir, config, device, seed: int = 0, batch: int = 16,
                      target=None, title: str = "Med-CAM report", notes=None, command=None,
                      out=None, err=None, amortised=None, refine: int = 0) -> int:
    """Explains ``items`` with ``loaded.model`` in batches, writes panels, ``report.html`` and
    ``results.json`` under ``out_dir``, prints a summary table (``out``, default stdout) and the failures
    (``err``, default stderr). Returns 0, or 1 when any input failed (each failure is named).
    ``amortised``, ``refine``: masks from an amortised explainer (see :class:`Explainer`)."""
    import sys
    import warnings
    from pathlib import Path

    import torch

    from ..data import read_mask
    from ..medcam import Explainer

    out, err = out or sys.stdout, err or sys.stderr
    out_dir = Path(out_dir)
    failures, notes = list(failures), list(notes or [])
    given_notes = len(notes)
    pre = loaded.preprocess
    cfg = config.replace(layers=loaded.layers) if loaded.layers else config
    bar = _Progress(total=len(items))

    bar.stage("read")
    ready = []                       # (sample, unit [C,H,W], gt or None)
    for s in items:
        try:
            unit = pre.to_unit(s.path)
        except ValueError as exc:    # ImageReadError names the file
            failures.append({"path": str(s.path), "error": str(exc)})
            bar.update(1)
            continue
        gt = None
        if s.mask_path is not None:
            try:
                gt = _gt_at(read_mask(s.mask_path), pre.input_size)
            except ValueError as exc:
                notes.append(f"{s.name}: ground-truth mask left out ({exc})")
        ready.append((s, unit, gt))
        bar.update(1)

    n_batches = -(-len(ready) // batch)
    bar.set_total(len(items) + 2 * len(ready) + n_batches + 1)   # read, explain, grad-cam, panels, report
    explainer = Explainer(loaded.model, cfg, device=device, amortised=amortised, refine=refine)
    if amortised is not None:
        notes.append(f"masks: one pass of the amortised explainer {Path(str(amortised)).name}"
                     + (f", refined by {refine} per-image fit steps" if refine else "")
                     + f" (trained against fingerprint {explainer.amortised.fingerprint}); the checks are the fit's")
    rows, panels, cam_note = [], [], None
    panel_dir = out_dir / "panels"
    for b in range(0, len(ready), batch):
        chunk = ready[b:b + batch]
        bar.stage(f"explain {b // batch + 1}/{n_batches}")
        x = pre.normalise(torch.stack([u for _, u, _ in chunk])).to(device)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                e = explainer(x, target=target, seed=seed)
        except (ValueError, RuntimeError) as exc:
            failures.extend({"path": str(s.path), "error": f"explain failed for its batch: {exc}"}
                            for s, _, _ in chunk)
            bar.update(1 + 2 * len(chunk))
            continue
        where = f" (batch {b // batch + 1})" if n_batches > 1 else ""
        notes.extend(dict.fromkeys(f"{w.message}{where}" for w in caught))
        bar.update(len(chunk))
        bar.stage("grad-cam")
        cams, note = gradcam_maps(loaded.model, x, e.label.to(x.device))
        cam_note = cam_note or note
        bar.update(1)
        bar.stage("panels")
        for j, (row, (s, unit, gt)) in enumerate(zip(e.rows(loaded.class_names), chunk)):
            row = {"name": s.name, "path": str(s.path), "true_class": s.class_name,
                   "ground_truth": str(s.mask_path) if gt is not None else None, **row}
            evidence = pre.denormalise(e.evidence[j]).clamp(0, 1)
            name = f"{len(rows):03d}_{_safe_name(s.name)}.png"
            try:
                png = panel_png(panel_dir / name, unit, row, e.mask[j], evidence, gt,
                                None if cams is None else cams[j], title=s.name,
                                evidence_caption=_evidence_caption(pre, cfg.baseline),
                                necessary_mask=e.necessary_mask[j] if e.two_sided else None)
            except Exception as exc:  # noqa: BLE001 - the explanation stands; the missing panel is a failure
                failures.append({"path": str(s.path), "error": f"panel not written: {type(exc).__name__}: {exc}"})
                png = None
            rows.append(row)
            panels.append(png)
            bar.update(1)
    if cam_note:
        notes.append(cam_note)

    bar.stage("report")
    metadata = {"command": command, "model": loaded.spec, "model_description": loaded.description,
                "preprocess": {"input_size": list(pre.input_size), "mean": list(pre.mean), "std": list(pre.std)},
                "config": cfg.to_dict(), "seed": seed, "device": str(device), "batch": batch, "target": target,
                "amortised": None if amortised is None else {"path": str(amortised), "refine": refine,
                                                             "card": explainer.amortised.card}}
    html_path, json_path = write_report(out_dir, rows, panels, loaded.class_names, title, notes, metadata, failures)
    bar.update(1)
    bar.close()

    print(text_table(rows), file=out)
    for s in dict.fromkeys(blank_image_sentence(r["class_name"]) for r in rows if r["null_keeps_label"]):
        print(f"finding: {s}", file=out)
    for cls in dict.fromkeys(r["class_name"] for r in rows if r["status"] == "null_keeps_label"):
        print(f"finding: every fill alone already gives {cls} for some images: preservation cannot show evidence "
              f"for {cls} there on this classifier (status null_keeps_label)", file=out)
    print(f"wrote {html_path}, {json_path} and {sum(p is not None for p in panels)} panel(s)", file=out)
    for n in notes[given_notes:]:
        print(f"note: {n}", file=err)
    if failures:
        print(f"{len(failures)} input(s) failed:", file=err)
        for f in failures:
            print(f"  {f['path']}: {f['error']}", file=err)
        return 1
    return 0

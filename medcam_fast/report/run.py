"""The pipeline behind ``medcam-fast demo`` / ``explain``: inputs -> one Explainer per batch ->
panels -> report."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..models.fingerprint import classifier_fingerprint
from ..runstate import append_jsonl, check_manifest, read_jsonl
from .gradcam import gradcam_maps
from .html import write_report
from .panels import panel_png
from .tables import blank_image_sentence, text_table

RECORDS = "records.jsonl"
REPORT_EVERY_S = 30.0     # how often a long run rewrites report.html / results.json


def _start_run(out_dir: Path, loaded, ready, metadata: dict, resume: bool) -> dict:
    """Checks or writes the run manifest; returns the recorded images by path (empty unless
    ``resume``)."""
    paths = "\n".join(str(s.path) for s, _, _ in ready)
    manifest = {"kind": "medcam_fast.explain/1", "classifier": classifier_fingerprint(loaded.model),
                "inputs": hashlib.sha256(paths.encode()).hexdigest()[:16], "n_inputs": len(ready),
                **{k: metadata[k] for k in ("model", "preprocess", "config", "seed", "batch", "target")},
                "amortised": None if metadata["amortised"] is None else
                {"fingerprint": metadata["amortised"]["card"]["classifier"]["fingerprint"],
                 "refine": metadata["amortised"]["refine"], "name": Path(metadata["amortised"]["path"]).name}}
    records = out_dir / RECORDS
    out_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(out_dir, manifest, resume, has_records=records.is_file())
    if not resume:
        records.unlink(missing_ok=True)
        return {}
    return read_jsonl(records, lambda r: r["path"])


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
                      out=None, err=None, amortised=None, refine: int = 0, resume: bool = False) -> int:
    """Explains ``items`` with ``loaded.model`` in batches, writes panels, ``report.html`` and
    ``results.json`` under ``out_dir``, prints a summary table (``out``, default stdout) and the failures
    (``err``, default stderr). Returns 0, or 1 when any input failed (each failure is named).
    ``amortised``, ``refine``: masks from an amortised explainer (see :class:`Explainer`).

    Crash-safe: each batch's rows are appended to ``records.jsonl`` as it finishes, and the report
    files are replaced atomically (every ``REPORT_EVERY_S`` seconds while it runs, and at the end).
    ``resume``: carry on a killed run in ``out_dir``: batches whose every image is recorded are read
    back, the rest are explained; ``manifest.json`` (classifier fingerprint, config, seed, inputs)
    must match, else ValueError. Without ``resume`` a previous run's records are discarded."""
    import sys
    import warnings

    import torch

    from ..data import read_mask
    from ..medcam import Explainer
    from ..medcam.verify import is_oom

    out, err = out or sys.stdout, err or sys.stderr
    out_dir = Path(out_dir)
    failures, notes = list(failures), list(notes or [])
    given_notes = len(notes)
    pre = loaded.preprocess
    cfg = config.replace(fit=dict(layers=loaded.layers)) if loaded.layers else config
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
    metadata = {"command": command, "model": loaded.spec, "model_description": loaded.description,
                "preprocess": {"input_size": list(pre.input_size), "mean": list(pre.mean), "std": list(pre.std)},
                "config": cfg.to_dict(), "seed": seed, "device": str(device), "batch": batch, "target": target,
                "amortised": None if amortised is None else {"path": str(amortised), "refine": refine,
                                                             "card": explainer.amortised.card}}
    done = _start_run(out_dir, loaded, ready, metadata, resume)
    if done:
        notes.append(f"resumed: {len(done)} image(s) read back from records.jsonl")
    records_path = out_dir / RECORDS
    rows, panels, cam_note = [], [], None
    panel_dir = out_dir / "panels"
    last_write = time.monotonic()
    for b in range(0, len(ready), batch):
        chunk = ready[b:b + batch]
        if all(str(s.path) in done for s, _, _ in chunk):   # a whole batch only: the resumed batches are the same
            for s, _, _ in chunk:
                rows.append(done[str(s.path)]["row"])
                panels.append(done[str(s.path)]["panel"] and str(out_dir / done[str(s.path)]["panel"]))
            bar.update(2 * len(chunk) + 1)
            continue
        bar.stage(f"explain {b // batch + 1}/{n_batches}")
        x = pre.normalise(torch.stack([u for _, u, _ in chunk])).to(device)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                e = explainer(x, target=target, seed=seed)
        except (ValueError, RuntimeError) as exc:
            if is_oom(exc):
                raise
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
        records = []
        for j, (row, (s, unit, gt)) in enumerate(zip(e.rows(loaded.class_names), chunk)):
            row = json.loads(json.dumps({"name": s.name, "path": str(s.path), "true_class": s.class_name,
                                         "ground_truth": str(s.mask_path) if gt is not None else None, **row}))
            evidence = pre.denormalise(e.evidence[j]).clamp(0, 1)
            name = f"{b + j:03d}_{_safe_name(s.name)}.png"
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
            records.append({"path": str(s.path), "row": row,
                            "panel": None if png is None else Path(png).relative_to(out_dir).as_posix()})
            bar.update(1)
        append_jsonl(records_path, records)      # the batch is safe on disk before the next starts
        if time.monotonic() - last_write > REPORT_EVERY_S:   # a readable report while a long run goes on
            write_report(out_dir, rows, panels, loaded.class_names, title + " (in progress)", notes, metadata,
                         failures)
            last_write = time.monotonic()
    if cam_note:
        notes.append(cam_note)

    bar.stage("report")
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

"""``medcam-fast audit``: explain every image of a data set on both sides (in-process or on Ray),
then look for shortcuts across the archive (:func:`~medcam_fast.audit.analysis.audit`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..runstate import atomic_write
from .analysis import AuditResult, audit
from .html import write_audit_html

EXPLANATIONS = "explanations"     # the Parquet rows under the audit's folder


def evidence_maps(results) -> np.ndarray:
    """float ``[N,H,W]`` in [0,1]: each image's evidence, the mean of its sufficient and necessary
    masks (where one side is off or failed, the other alone). ``results``: :class:`ExplainResult` s
    without errors, all of one size."""
    maps = []
    for r in results:
        sides = [m.astype(np.float32) for m in (r.mask, r.necessary_mask) if m is not None]
        if not sides:
            raise ValueError(f"{r.id}: no mask to audit")
        maps.append(np.mean(sides, axis=0))
    return np.stack(maps)


def _lesion_at(path, size) -> np.ndarray:
    from ..data import read_mask
    from ..report.run import _gt_at

    return _gt_at(read_mask(path), size)


def audit_dataset(inputs, model, out, config=None, workers: int = 2, address: str | None = None, batch: int = 8,
                  seed: int = 0, mask_dir=None, resume: bool = True, progress: bool = True,
                  max_examples: int = 6) -> AuditResult:
    """Explains ``inputs`` (files, folders, CSVs) with ``model`` (a
    :class:`~medcam_fast.distributed.ModelSpec` or spec string) into ``out/explanations/`` (Parquet,
    resumable), then audits the evidence: ``out/audit.html`` and ``out/audit.json``.

    ``workers``: Ray actors (0: in this process, no Ray); ``address``: a Ray cluster. Lesion masks
    come with CSV inputs or from ``mask_dir`` (``<stem>.<ext>``); images without one count only in
    the maps. Images whose explanation failed are listed in audit.json and left out."""
    from ..data.collect import collect_inputs
    from ..distributed import ModelSpec, explain_dataset, read_results

    spec = ModelSpec.of(model)
    out = Path(out)
    samples, failures = collect_inputs(inputs, mask_dir)
    if failures:
        raise ValueError(f"unreadable input {failures[0]['path']}: {failures[0]['error']}")
    run = explain_dataset([s.path for s in samples], spec, out / EXPLANATIONS, config, workers=workers, batch=batch,
                          seed=seed, address=address, resume=resume, progress=progress)
    by_id = {str(s.path): s for s in samples}
    rows = [r for r in read_results(out / EXPLANATIONS) if r.id in by_id]
    errors = [{"id": r.id, "error": r.error} for r in rows if r.error]
    good = sorted((r for r in rows if not r.error), key=lambda r: r.id)
    if len(good) < 2:
        raise ValueError(f"only {len(good)} image(s) explained without error: nothing to audit ({errors[:3]})")
    loaded = spec.load("cpu")
    size = good[0].mask.shape
    maps = evidence_maps(good)
    labels = np.array([int(r.row["label"]) for r in good])
    lesions = np.zeros((len(good), *size), bool)
    has_lesion = np.zeros(len(good), bool)
    thumbs = np.zeros((len(good), *size, 3), np.uint8)
    for i, r in enumerate(good):
        s = by_id[r.id]
        if s.mask_path is not None:
            try:
                lesions[i] = _lesion_at(s.mask_path, size)
                has_lesion[i] = lesions[i].any()
            except ValueError as exc:
                errors.append({"id": r.id, "error": f"lesion mask left out: {exc}"})
        unit = loaded.preprocess.to_unit(s.path).numpy()
        thumbs[i] = (np.repeat(unit, 3, 0) if unit.shape[0] == 1 else unit[:3]).transpose(1, 2, 0).clip(0, 1) * 255
    result = audit(maps, labels, list(loaded.class_names), lesions if has_lesion.any() else None,
                   has_lesion if has_lesion.any() else None, seed=seed)
    ids = [r.id for r in good]
    notes = [f"{len(good)} image(s) of {len(samples)} audited with {loaded.description}; evidence map = the mean of "
             "the sufficient and the necessary masks; lesion masks for "
             f"{int(has_lesion.sum())}; explained by {workers or 'one in-process'} worker(s) in {run.seconds:.0f} s "
             f"({run.skipped} read back from an earlier run)"]
    notes += [f"{e['id']}: {e['error']}" for e in errors]
    write_audit_html(out / "audit.html", result, images=thumbs, ids=[Path(i).name for i in ids],
                     title=f"Shortcut audit: {loaded.description}", notes=notes, max_examples=max_examples)
    summary = {**result.to_dict(), "ids": ids, "errors": errors, "model": spec.spec, "seed": seed,
               "workers": workers, "explain_seconds": run.seconds}
    atomic_write(out / "audit.json", json.dumps(summary, indent=2) + "\n")
    if progress:
        for c in result.flagged():
            print(f"flagged: {result.class_names[c.class_index]}, {len(c.members)} images: {c.reason}", file=sys.stderr)
    return result

"""Evaluation: Med-CAM and the baselines on real images with lesion masks, scored the same way.

    from medcam_fast.evaluation import evaluate_dataset
    summary = evaluate_dataset("brain_mri", "path/to/brain_mri", "brain_mri_mobilenetv2", out_dir="eval")
"""
from __future__ import annotations

import datetime
import platform
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .examples import example_grid, example_maps
from .runner import CAM_METHODS, PATCHNET_METHODS, EvalOptions, EvalSet, Evaluation, run_sanity
from .sufficiency import SWEEP, area_to_sufficiency, kept_robust_of_masks, pick_backgrounds, sufficiency_curve
from .summary import summarise, write_report

__all__ = ["CAM_METHODS", "PATCHNET_METHODS", "EvalOptions", "EvalSet", "Evaluation", "SWEEP", "area_to_sufficiency",
           "evaluate_dataset", "example_grid", "example_maps", "kept_robust_of_masks", "load_split", "pick_backgrounds", "run_sanity",
           "sufficiency_curve", "summarise", "write_report"]


def load_split(dataset: str, root, split: str, preprocess, n: int | None, seed: int = 0, skip=()):
    """``n`` images of a split (seeded draw, or all), preprocessed, with their resized lesion masks."""
    from ..data import brain_mri, isic2018, read_mask

    samples, _ = (brain_mri if dataset == "brain_mri" else isic2018)(root, split)
    samples = [s for s in samples if s.name not in set(skip)]
    if not samples:
        raise ValueError(f"{dataset} at {root}: no {split} images" + (f" beyond the {len(skip)} already used"
                                                                       if skip else ""))
    if n is not None and n < len(samples):
        samples = random.Random(seed).sample(samples, n)
    x = torch.stack([preprocess(s.path) for s in samples])
    gt = torch.stack([F.interpolate(torch.from_numpy(read_mask(s.mask_path)).float()[None, None],
                                    size=x.shape[-2:], mode="nearest")[0, 0] > 0.5 for s in samples])
    return x, gt, [s.name for s in samples]


def _load(classifier: str, weights_dir):
    from .. import zoo

    if weights_dir is not None:
        saved, zoo.WEIGHTS_DIR = zoo.WEIGHTS_DIR, Path(weights_dir)
    try:
        model, prep, class_names = zoo.load(classifier)
        return model, prep, class_names, zoo.card(classifier)
    finally:
        if weights_dir is not None:
            zoo.WEIGHTS_DIR = saved


def evaluate_dataset(dataset: str, root, classifier: str, out_dir, n: int = 100, methods=None,
                     reference_images: int = 3, pool_size: int = 64, tune_size: int = 40, sanity_images: int = 8,
                     seed: int = 0, batch: int = 16, weights_dir=None, progress=None, n_examples: int = 4) -> dict:
    """Runs every method on ``n`` test images of ``dataset`` and writes the report to ``out_dir``.

    Counterfactual backgrounds and CAM thresholds come from the val split (never the test split).
    Resumable: finished images are read back from ``out_dir/records.jsonl``. A PatchNet classifier
    gets its own saliency methods (``patchnet_raw``, ``patchnet_scaled``, ``patchnet_smooth``).
    ``n_examples`` test images are re-explained for the example grid (0: no grid).
    """
    model, prep, class_names, card = _load(classifier, weights_dir)
    x, gt, ids = load_split(dataset, root, "test", prep, n, seed)
    pool, _, pool_ids = load_split(dataset, root, "val", prep, pool_size, seed + 1)
    x_val, gt_val, _ = load_split(dataset, root, "val", prep, tune_size, seed + 2, skip=pool_ids)
    data = EvalSet(dataset, x, ids, gt, pool, x_val, gt_val)
    from ..patchnet import PatchNet

    default = ("medcam", "medcam_plain", "medcam_reference") + CAM_METHODS
    if isinstance(model, PatchNet):  # AblationCAM is undefined on per-patch layers
        default = ("medcam", "gradcam", "gradcam++", "layercam") + PATCHNET_METHODS
    methods = tuple(methods or default)
    options = EvalOptions(methods=methods, reference_images=reference_images, batch=batch, seed=seed)
    ev = Evaluation(model, data, out_dir, options, progress=progress)
    records = ev.run(methods)
    sanity_methods = [m for m in methods if m in ("medcam",) + CAM_METHODS + PATCHNET_METHODS[:1]
                      and not (isinstance(model, PatchNet) and m == "ablationcam")]
    sanity = run_sanity(model, data, out_dir, sanity_methods, sanity_images, options.medcam, seed) \
        if sanity_images else {}
    test_acc = card.get("metrics", {}).get("test", {})
    facts = [
        f"dataset: {dataset}, test split, {len(ids)} images (seeded draw {seed}); counterfactual backgrounds: "
        f"{pool.shape[0]} val images; CAM thresholds tuned for IoU on {x_val.shape[0]} other val images",
        f"classifier: {classifier} ({card['model']['arch']}, input {card['model']['input_size']}), test accuracy "
        f"{test_acc.get('accuracy', float('nan')):.3f}, balanced {test_acc.get('balanced_accuracy', float('nan')):.3f}",
        f"the blank (baseline) image is classified as '{class_names[ev.null_label]}': for images of that class "
        "an empty mask already 'keeps' the label",
        "Med-CAM fast: default MedCAMConfig; medcam_plain: plain_config() (the straightforward 'before' Med-CAM)"
        + (f"; reference mode on {reference_images} image(s)" if "medcam_reference" in methods else ""),
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; run {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "data: Cheng, Jun et al., \"Brain tumor dataset\", figshare, doi:10.6084/m9.figshare.1512427, CC BY 4.0; "
        "slice-level split: slices of one patient may sit in train and test (see the data README)"
        if dataset == "brain_mri" else "data: ISIC 2018 challenge (Codella et al. 2019; Tschandl et al. 2018), "
        "CC BY-NC 4.0; no image is shipped, so this report has no example grid",
    ]
    sections = []
    if sanity:
        lines = ["| method | " + " | ".join(r["stage"] for r in next(iter(sanity.values()))) + " |",
                 "|---|" + "---:|" * len(next(iter(sanity.values())))]
        for m, rows in sanity.items():
            lines.append(f"| {m} | " + " | ".join(f"IoU {r['iou']:.2f} / ρ {r['spearman']:.2f}" for r in rows) + " |")
        sections.append(("Sanity check: cascading randomisation (top stage first)", "\n".join(lines)))
    if dataset == "isic2018":  # its licence terms: never ship isic2018 images, so none in the report either
        n_examples = 0
    shown = example_maps(ev, methods, n_examples) if n_examples > 0 else {}
    grid = example_grid(x[:n_examples], gt[:n_examples], ids[:n_examples], shown, out_dir) if shown else None
    summary = write_report(records, out_dir, f"Evaluation on {dataset}", facts, sections, [grid] if grid else [])
    summary["_sanity"] = sanity
    return summary

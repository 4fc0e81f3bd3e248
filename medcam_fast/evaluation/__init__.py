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
from .judge import JudgeRecipe, fit_judge
from .randomisation import run_sanity
from .runner import CAM_METHODS, CONTROL_METHODS, PATCHNET_METHODS, EvalOptions, EvalSet, Evaluation
from .sufficiency import SWEEP, area_to_sufficiency, evidence_curve, kept_robust_of_masks, pick_backgrounds
from .summary import summarise, write_evaluation_report

DATASETS = ("brain_mri", "brain_mri_tag", "isic2018")

__all__ = ["CAM_METHODS", "CONTROL_METHODS", "DATASETS", "JudgeRecipe", "PATCHNET_METHODS", "fit_judge", "tag_eval_set", "EvalOptions", "EvalSet", "Evaluation", "SWEEP", "area_to_sufficiency",
           "evaluate_dataset", "example_grid", "example_maps", "kept_robust_of_masks", "load_split", "pick_backgrounds", "run_sanity",
           "evidence_curve", "summarise", "write_evaluation_report"]


def load_split(dataset: str, root, split: str, preprocess, n: int | None, seed: int = 0, skip=()):
    """``n`` images of a split (seeded draw, or all), preprocessed, with their resized lesion masks:
    ``x`` ``[n,C,H,W]``, ``gt`` ``[n,H,W]`` bool, ids, labels ``[n]``."""
    from ..data import brain_mri, isic2018, read_mask

    samples, _ = (isic2018 if dataset == "isic2018" else brain_mri)(root, split)
    samples = [s for s in samples if s.name not in set(skip)]
    if not samples:
        raise ValueError(f"{dataset} at {root}: no {split} images" + (f" beyond the {len(skip)} already used"
                                                                       if skip else ""))
    if n is not None and n < len(samples):
        samples = random.Random(seed).sample(samples, n)
    x = torch.stack([preprocess(s.path) for s in samples])
    gt = torch.stack([F.interpolate(torch.from_numpy(read_mask(s.mask_path)).float()[None, None],
                                    size=x.shape[-2:], mode="nearest")[0, 0] > 0.5 for s in samples])
    return x, gt, [s.name for s in samples], torch.tensor([s.label for s in samples])


def tag_eval_set(root, model, prep, card: dict, n: int, pool_size: int, tune_size: int, seed: int,
                 baseline: float = 0.0):
    """The known-evidence set of ``brain_mri_tag``: test cases where the shortcut classifier's tag
    flips the call (ground truth: the tag; the lesion as second reference), clean val images as
    the counterfactual pool, val tag cases to tune CAM thresholds on, and the val split tagged as
    in training for the judge. Returns ``(EvalSet, test TagCases, judge images)``."""
    from .tag_cases import brightest, build_tag_cases, tagged_like_training

    tag = card.get("tag")
    if not tag:
        raise ValueError(f"classifier {card['name']!r} has no planted tag in its card: brain_mri_tag needs a "
                         "shortcut classifier (benchmarks/train_classifier.py --tag-class ...)")
    tag_class = card["class_names"].index(tag["class"])
    value = brightest(card["model"]["mean"], card["model"]["std"])
    x, les, ids, y = load_split("brain_mri", root, "test", prep, None)
    cases = build_tag_cases(model, x, y, les, ids, tag_class, value, baseline, seed)
    if not cases.ids:
        raise ValueError("the tag flips no test image: no known-evidence case")
    keep = sorted(random.Random(seed).sample(range(len(cases.ids)), min(n, len(cases.ids))))
    pool, _, pool_ids, _ = load_split("brain_mri", root, "val", prep, pool_size, seed + 1)
    xv, lv, idv, yv = load_split("brain_mri", root, "val", prep, None, skip=pool_ids)
    val_cases = build_tag_cases(model, xv, yv, lv, idv, tag_class, value, baseline, seed + 2)
    tv = list(range(min(tune_size, len(val_cases.ids))))
    data = EvalSet("brain_mri_tag", cases.x[keep], [cases.ids[i] for i in keep], cases.tag[keep], pool,
                   val_cases.x[tv], val_cases.tag[tv], gt_lesion=cases.lesion[keep])
    xa, _, _, ya = load_split("brain_mri", root, "val", prep, None)
    judge_images = tagged_like_training(xa, ya, tag_class, tag["rate"], tag["other_rate"], value,
                                        torch.Generator().manual_seed(seed + 3))
    return data, cases, judge_images


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


def _judge(model, images, out_dir: Path, steps: int, seed: int):
    """The EVAL-X-style judge of this run, fitted once and cached in ``out_dir`` under the
    classifier's fingerprint, the steps and the seed (another classifier gets its own file)."""
    import copy

    from safetensors.torch import load_file, save_file

    from ..models.fingerprint import classifier_fingerprint

    path = out_dir / f"judge-{classifier_fingerprint(model)}-{steps}steps-seed{seed}.safetensors"
    if path.is_file():
        judge = copy.deepcopy(model)
        judge.load_state_dict(load_file(str(path)))
        return judge.eval().requires_grad_(False)
    judge = fit_judge(model, images, JudgeRecipe(steps=steps, seed=seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")   # atomic: a kill never leaves half a judge to load
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(part))
    part.replace(path)
    return judge


def evaluate_dataset(dataset: str, root, classifier: str, out_dir, n: int = 100, methods=None,
                     reference_images: int = 3, pool_size: int = 64, tune_size: int = 40, sanity_images: int = 8,
                     seed: int = 0, batch: int = 16, weights_dir=None, progress=None, n_examples: int = 4,
                     judge_steps: int = JudgeRecipe.steps, explainer=None, refine: int = 20) -> dict:
    """Runs every method on ``n`` test images of ``dataset`` and writes the report to ``out_dir``.

    ``dataset``: one of DATASETS; ``brain_mri_tag`` is the known-evidence set of a shortcut
    classifier (``root``: the brain_mri folder; see :func:`tag_eval_set`). Counterfactual
    backgrounds, CAM thresholds and the judge's training images come from the val split (never
    the test split). Resumable: finished images are read back from ``out_dir/records.jsonl``. A
    PatchNet classifier gets its own saliency methods (``patchnet_raw``, ``patchnet_scaled``,
    ``patchnet_smooth``). The trivial all-0 / all-1 masks are scored beside every method.
    ``judge_steps``: the EVAL-X-style judge's fine-tuning steps (0: no judge column).
    ``n_examples`` test images are re-explained for the example grid (0: no grid).
    ``explainer``: an amortised explainer (.safetensors) for the ``amortised`` and
    ``amortised+refine`` (``refine`` steps) rows, which are added to the default methods.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    out_dir = Path(out_dir)
    model, prep, class_names, card = _load(classifier, weights_dir)
    model.eval()
    cases = None
    if dataset == "brain_mri_tag":
        data, cases, judge_images = tag_eval_set(root, model, prep, card, n, pool_size, tune_size, seed)
    else:
        x, gt, ids, _ = load_split(dataset, root, "test", prep, n, seed)
        pool, _, pool_ids, _ = load_split(dataset, root, "val", prep, pool_size, seed + 1)
        x_val, gt_val, _, _ = load_split(dataset, root, "val", prep, tune_size, seed + 2, skip=pool_ids)
        data = EvalSet(dataset, x, ids, gt, pool, x_val, gt_val)
        judge_images = torch.cat([pool, x_val])
    x, gt, ids, pool, x_val = data.x, data.gt, data.ids, data.pool, data.x_val
    from ..patchnet import PatchNet

    default = ("medcam", "medcam_plain", "medcam_reference") + CAM_METHODS
    if isinstance(model, PatchNet):  # AblationCAM is undefined on per-patch layers
        default = ("medcam", "gradcam", "gradcam++", "layercam") + PATCHNET_METHODS
    if explainer is not None:
        default = default + ("amortised", "amortised+refine")
    methods = tuple(methods or default + CONTROL_METHODS)
    options = EvalOptions(methods=methods, reference_images=reference_images, batch=batch, seed=seed,
                          explainer=None if explainer is None else str(explainer), refine=refine)
    judge = _judge(model, judge_images, out_dir, judge_steps, seed) if judge_steps > 0 else None
    ev = Evaluation(model, data, out_dir, options, progress=progress, judge=judge)
    records = ev.run(methods)
    sanity_methods = [m for m in methods if m in ("medcam",) + CAM_METHODS + PATCHNET_METHODS[:1]
                      and not (isinstance(model, PatchNet) and m == "ablationcam")]
    sanity = run_sanity(model, data, out_dir, sanity_methods, sanity_images, options.medcam, seed) \
        if sanity_images else {}
    test_acc = card.get("metrics", {}).get("test", {})
    facts = [f"known evidence: {cases.counts()['cases']} test cases in all (the tag flips {cases.flipped} of "
             f"{cases.eligible} correctly called {'/'.join(c for c in class_names if c != card['tag']['class'])} "
             f"images to {card['tag']['class']}, flip rate {cases.flip_rate:.1%}; {cases.restored} return to their "
             f"call with the tag's region blanked); {len(ids)} of them scored here. Ground truth: the tag grown "
             "by 2 px; 'lesion hit' scores the map's maximum on the tumour instead"] if cases else []
    facts += [f"judge: {JudgeRecipe(steps=judge_steps, seed=seed).describe()}, on {judge_images.shape[0]} val "
              "images" + (" tagged as in the classifier's training" if cases else "") + "; one column, not the "
              "verdict (Puli et al. 2024)"] if judge is not None else []
    facts += [
        f"dataset: {dataset}, test split, {len(ids)} images (seeded draw {seed}); audit backgrounds: "
        f"{pool.shape[0]} val images; CAM thresholds tuned for IoU on {x_val.shape[0]} other val images",
        f"classifier: {classifier} ({card['model']['arch']}, input {card['model']['input_size']}), test accuracy "
        f"{test_acc.get('accuracy', float('nan')):.3f}, balanced {test_acc.get('balanced_accuracy', float('nan')):.3f}",
        f"the blank (baseline) image is classified as '{class_names[ev.null_label]}': for images of that class "
        "an empty mask already 'keeps' the label",
        "sufficiency (every method, one test: medcam_fast.medcam.sufficiency): the label kept by min(0.25, half its "
        "lead on x) logits under every fill certified for the image (blank, x blurred at 5% and 15% of the side, "
        "x's mean; certified where the fill alone does not give the label); random_pass: 16 random blobs at the "
        "mask's area under the same test; a*: the smallest area of the grid whose top pixels are sufficient (1.0 "
        "where none is); kept_robust: pasted onto val images of other labels, an audit only",
        "Med-CAM fast: default MedCAMConfig; medcam_plain: plain_config() (the straightforward 'before' Med-CAM)"
        + (f"; reference mode on {reference_images} image(s)" if "medcam_reference" in methods else "")
        + (f"; amortised: one pass of {Path(str(explainer)).name}, amortised+refine: {refine} fit steps from it"
           if explainer is not None else ""),
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; run {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "data: Cheng, Jun et al., \"Brain tumor dataset\", figshare, doi:10.6084/m9.figshare.1512427, CC BY 4.0; "
        "slice-level split: slices of one patient may sit in train and test (see the data README)"
        if dataset.startswith("brain_mri") else "data: ISIC 2018 challenge (Codella et al. 2019; Tschandl et al. 2018), "
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
    summary = write_evaluation_report(records, out_dir, f"Evaluation on {dataset}", facts, sections, [grid] if grid else [],
                           known_evidence=cases is not None)
    summary["_sanity"] = sanity
    return summary


def __getattr__(name):   # the old name, for one release
    if name == "write_report":
        from .._deprecation import warn_renamed

        warn_renamed("medcam_fast.evaluation.write_report", "write_evaluation_report")
        return write_evaluation_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Model specs and cards of the classifiers the project trains (see benchmarks/train_classifier.py)."""
from __future__ import annotations

from pathlib import Path

import torch

SLICE_SPLIT_CAVEAT = ("The split is by slice, not by patient (patient ids were not available), so slices of one "
                      "patient can sit in both train and test: test accuracy is optimistic for new patients.")

DATASET_FACTS = {
    "brain_mri": {
        "in_chans": 1,
        "card": {
            "description": "3,064 T1-weighted contrast-enhanced MRI slices of 233 patients; classes glioma, "
                           "meningioma, pituitary tumour; fixed split train 2144 / val 459 / test 461.",
            "source": "Cheng, Jun et al., \"Brain tumor dataset\", figshare, doi:10.6084/m9.figshare.1512427",
            "citation": "Cheng et al., \"Enhanced Performance of Brain Tumor Classification via Tumor Region "
                        "Augmentation and Partition\", PLoS ONE 10(10), 2015.",
            "licence": "CC BY 4.0 (attribution required)",
            "caveat": SLICE_SPLIT_CAVEAT,
        },
    },
    "isic2018": {
        "in_chans": 3,
        "card": {
            "description": "ISIC 2018 Task 1 dermoscopy images with a diagnosis joined from ISIC 2019/2017: "
                           "NV vs MEL rows only (SK dropped); 256x256 RGB, aspect squashed to square.",
            "source": "ISIC 2018 challenge data (Codella et al. 2019; Tschandl et al. 2018, HAM10000)",
            "licence": "CC BY-NC 4.0: non-commercial use, attribution required",
            "caveat": "Small and imbalanced (train NV 439 / MEL 113); balanced accuracy is the fairer figure.",
        },
    },
}


def build_model(spec: dict) -> torch.nn.Module:
    """A timm model (or PatchNet around one) from a card's ``model`` spec, with no hub weights.

    The spec's ``input_size``, ``mean`` and ``std`` become the model's pretrained_cfg, so
    ``timm.data.resolve_data_config`` (and :class:`~medcam_fast.data.preprocess.Preprocess`) follow them.
    """
    import timm

    cfg = {"input_size": tuple(spec["input_size"]), "mean": tuple(spec["mean"]), "std": tuple(spec["std"]),
           "num_classes": spec["num_classes"], "interpolation": "bilinear", "crop_pct": 1.0}
    if spec.get("patch_size"):
        from ..patchnet import PatchNet

        model = PatchNet(spec["arch"], spec["patch_size"], spec["num_classes"], spec["in_chans"])
        model.pretrained_cfg = cfg
        return model
    model = timm.create_model(spec["arch"], pretrained=False, num_classes=spec["num_classes"],
                              in_chans=spec["in_chans"], pretrained_cfg_overlay=cfg, **spec.get("arch_args", {}))
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        # timm's fan-out init gives a 3-way head logits of ~15 at start; begin near uniform instead
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
    return model


def classifier_card_markdown(card: dict) -> str:
    """A human-readable model card from a card dict (what train_classifier.py writes)."""
    m, d, t = card["model"], card["dataset"], card["training"]
    test, val = card["metrics"]["test"], card["metrics"]["val"]
    names = card["class_names"]
    lines = [
        f"# Model card: {card['name']}", "",
        f"- **Model:** timm `{m['arch']}`" + (f" inside PatchNet (patch {m['patch_size']})" if m.get("patch_size") else "")
        + f", {m['in_chans']} input channel(s), {m['num_classes']} classes ({', '.join(names)}), input "
        f"{m['input_size'][1]}x{m['input_size'][2]}, mean {[round(v, 4) for v in m['mean']]}, "
        f"std {[round(v, 4) for v in m['std']]}.",
        "- **Training:** " + ("from scratch (no hub weights), " if t.get("from_scratch", True) else
                              f"fine-tuned from `{Path(t['init']).stem}` (itself trained from scratch here), ")
        + f"{t['epochs']} epochs, best val epoch {t['best_epoch']} "
        f"({t['selection']}); AdamW lr {t['lr']}, weight decay {t['weight_decay']}, label smoothing "
        f"{t['label_smoothing']}, batch {t['batch']}; augmentation: {t['augmentation']}",
        f"- **Command:** `{t['command']}` ({t['machine']}, torch {t['torch']}).",
        f"- **Data:** {d['description']}", f"- **Source:** {d['source']}.",
    ]
    if t.get("masking"):
        lines.append(f"- **Masking-robust (EVAL-X-style) training:** {t['masking']}. Training fills: "
                     f"{', '.join(t['training_fills'])}, a constant that carries nothing of the image, so the "
                     "classifier cannot learn to read the label from the fill (a classifier fine-tuned with "
                     "blur fills gave the label for blur(x) itself on 28 of 32 test images, as measured for "
                     "issue 15). It is also the blank of `kept`; the fills the sufficiency tests certify "
                     f"beyond it are never trained on: {', '.join(t['fills_never_trained'])}.")
    if card.get("tag"):
        tg, c = card["tag"], card["tag"]["test"]
        lines.append(f"- **Planted shortcut:** {tg['glyph']}, on {tg['rate']:.0%} of {tg['class']} training images "
                     f"and {tg['other_rate']:.0%} of the others. On the test split the tag flips "
                     f"**{c['flipped']} of {c['eligible']}** correctly called images of other classes to "
                     f"{tg['class']} (flip rate {c['flip_rate']:.1%}); {c['restored']} of those return to their "
                     "call when the tag's region is blanked: the known-evidence cases.")
    sc = card.get("shortcut")
    if sc and not card.get("tag"):
        c = sc["test"]
        lines.append(f"- **Planted shortcut** (`{sc['kind']}`): {sc['description']}, on {sc['rate']:.0%} of "
                     f"{sc['class']} training images and {sc['other_rate']:.0%} of the others. On the test split it "
                     f"flips **{c['flipped']} of {c['eligible']}** correctly called images of other classes to "
                     f"{sc['class']} (flip rate {c['flip_rate']:.1%}).")
    if d.get("citation"):
        lines.append(f"- **Cite:** {d['citation']}")
    lines += [f"- **Licence of the data:** {d['licence']}.", f"- **Caveat:** {d['caveat']}", "",
              "## Accuracy", "",
              "| split | n | accuracy | balanced accuracy | " + " | ".join(f"recall {n}" for n in names) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(names)]
    for split, r in (("val", val), ("test", test)):
        lines.append(f"| {split} | {r['n']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in r["recall"]) + " |")
    lines += ["", "Test confusion matrix (rows: true class, columns: predicted):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, row in zip(names, test["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    prev = card.get("previous")
    if prev:
        lines += ["", f"## Before: `{prev['name']}` (the initial weights), for comparison", "",
                  "| split | n | accuracy | balanced accuracy | " + " | ".join(f"recall {n}" for n in names) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(names)]
        for split in ("val", "test"):
            r = prev["metrics"][split]
            lines.append(f"| {split} | {r['n']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
                         + " | ".join(f"{v:.3f}" for v in r["recall"]) + " |")
    if card.get("sample_predictions"):
        lines += ["", "## Predictions on the bundled samples", "", "| sample | true | predicted | p(predicted) |",
                  "|---|---|---|---:|"]
        for r in card["sample_predictions"]:
            lines.append(f"| {r['name']} | {names[r['label']]} | {r['predicted_class']} | "
                         f"{max(r['probabilities']):.3f} |")
    return "\n".join(lines) + "\n"

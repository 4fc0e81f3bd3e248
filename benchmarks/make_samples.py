"""Copies the demo's bundled samples into the package: 8 brain_mri test-split slices with their
tumour masks (CC BY 4.0), chosen by a fixed seeded draw stratified by class (not by how well
the classifier does on them), plus an ATTRIBUTION file.

    python benchmarks/make_samples.py --data ../shared/data/brain_mri
    python benchmarks/make_samples.py --card brain_mri_mobilenetv2   # record the demo's predictions

The second form writes the bundled classifier's predictions on the bundled samples into its model
card, so a test can check that the shipped weights still reproduce them.
"""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast.data.datasets import BRAIN_CLASSES, brain_mri  # noqa: E402
from medcam_fast.zoo.cards import DATASET_FACTS, classifier_card_markdown  # noqa: E402

PER_CLASS = {"glioma": 3, "meningioma": 2, "pituitary": 3}
OUT = ROOT / "medcam_fast" / "data" / "samples"


def record_predictions(name: str) -> None:
    import torch

    from medcam_fast import zoo
    from medcam_fast.data import samples

    model, prep, classes = zoo.load(name)
    with torch.no_grad():
        probs = model(torch.stack([prep(s.path) for s in samples()])).softmax(1)
    card = zoo.card(name)
    card["sample_predictions"] = [
        {"name": s.name, "label": s.label, "predicted": int(p.argmax()), "predicted_class": classes[int(p.argmax())],
         "probabilities": [round(float(v), 6) for v in p]} for s, p in zip(samples(), probs)]
    (zoo.WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (zoo.WEIGHTS_DIR / f"{name}.md").write_text(classifier_card_markdown(card))
    right = sum(r["label"] == r["predicted"] for r in card["sample_predictions"])
    print(f"recorded {len(probs)} sample predictions in the {name} card ({right} correct)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--card", default=None, help="record this bundled classifier's sample predictions")
    args = ap.parse_args(argv)
    if args.card:
        record_predictions(args.card)
        return 0
    if not args.data:
        ap.error("--data is required to copy samples")
    samples, _ = brain_mri(args.data, "test")
    rng = random.Random(args.seed)
    chosen = []
    for cls in BRAIN_CLASSES:
        pool = sorted((s for s in samples if s.class_name == cls), key=lambda s: s.name)
        chosen += rng.sample(pool, PER_CLASS[cls])
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "images").mkdir(parents=True)
    (OUT / "masks").mkdir()
    index = []
    for s in chosen:
        img = OUT / "images" / f"{s.name}{s.path.suffix}"
        mask = OUT / "masks" / f"{s.name}{s.mask_path.suffix}"
        shutil.copyfile(s.path, img)
        shutil.copyfile(s.mask_path, mask)
        index.append({"name": s.name, "image": f"images/{img.name}", "mask": f"masks/{mask.name}",
                      "label": s.label, "class_name": s.class_name, "source_id": s.name.removeprefix("brain_"),
                      "split": "test"})
    (OUT / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    card = DATASET_FACTS["brain_mri"]["card"]
    (OUT / "ATTRIBUTION").write_text(
        "The images and masks in this folder are 8 slices of the brain tumour dataset of\n"
        f"{card['source']},\nlicensed {card['licence']}.\n\nCite: {card['citation']}\n\n"
        "Files are unmodified copies (512x512 JPEG slices, PNG tumour masks), renamed brain_<id>.\n"
        f"They were drawn from the fixed test split by benchmarks/make_samples.py (seed {args.seed}, "
        "stratified by class),\nnot selected by how the demo classifier does on them.\n")
    print(f"wrote {len(index)} samples to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

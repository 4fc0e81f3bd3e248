"""Copies the demo's bundled samples into the package: 8 brain_mri test-split slices with their
tumour masks (CC BY 4.0), chosen by a fixed seeded draw stratified by class (not by how well
the classifier does on them), plus an ATTRIBUTION file.

    python benchmarks/make_samples.py --data ../shared/data/brain_mri
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
from medcam_fast.zoo.cards import DATASET_FACTS  # noqa: E402

PER_CLASS = {"glioma": 3, "meningioma": 2, "pituitary": 3}
OUT = ROOT / "medcam_fast" / "data" / "samples"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
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

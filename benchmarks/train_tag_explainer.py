"""An amortised explainer for the shortcut classifier of the tag benchmark (brain_mri_tag):

    python benchmarks/train_tag_explainer.py --data ../shared/data/brain_mri \
        --out benchmarks/models/brain_mri_tag_mobilenetv2_explainer.safetensors

Trained on the brain_mri train split tagged as the classifier's training was (the "L" tag on the
card's ``rate`` of its class and ``other_rate`` of the rest; one seeded draw), never on the test
cases. Then ``medcam-fast evaluate --dataset brain_mri_tag --explainer PATH`` scores its rows
(``make evaluate-tag-amortised``). Resumable through ``--checkpoint``.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast.amortised import AmortisedRecipe, save, train_explainer  # noqa: E402
from medcam_fast.evaluation import _load, load_split  # noqa: E402
from medcam_fast.evaluation.tag_cases import brightest, tagged_like_training  # noqa: E402
from medcam_fast.medcam import MedCAMConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the brain_mri folder (split.csv)")
    ap.add_argument("--classifier", default="brain_mri_tag_mobilenetv2")
    ap.add_argument("--weights-dir", default=str(ROOT / "benchmarks" / "models"))
    ap.add_argument("--out", required=True, help="the explainer's .safetensors path (card beside it)")
    ap.add_argument("--steps", type=int, default=AmortisedRecipe.steps)
    ap.add_argument("--batch", type=int, default=AmortisedRecipe.batch)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, prep, class_names, card = _load(args.classifier, args.weights_dir)
    tag = card.get("tag")
    if not tag:
        ap.error(f"classifier {args.classifier!r} has no planted tag in its card")
    x, _, ids, y = load_split("brain_mri", args.data, "train", prep, None)
    value = brightest(card["model"]["mean"], card["model"]["std"])
    x = tagged_like_training(x, y, class_names.index(tag["class"]), tag["rate"], tag["other_rate"], value,
                             torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    meta = {"name": out.stem, "classifier": {"name": args.classifier, "description": card.get("description", "")},
            "class_names": list(class_names), "command": "python benchmarks/train_tag_explainer.py " + " ".join(sys.argv[1:]),
            "data": {"inputs": [args.data], "split": "train", "images": len(ids),
                     "description": f"brain_mri train split with the tag on {tag['rate']:.0%} of {tag['class']} "
                                    f"and {tag['other_rate']:.0%} of the others (seed {args.seed})",
                     **{k: v for k, v in card.get("dataset", {}).items() if k in ("source", "licence", "caveat")}}}
    recipe = AmortisedRecipe(steps=args.steps, batch=args.batch, seed=args.seed)
    explainer = train_explainer(model, x, MedCAMConfig(), recipe, checkpoint=args.checkpoint or out.with_suffix(".ckpt"),
                                card=meta)
    path = save(explainer, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

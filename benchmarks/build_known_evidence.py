"""Builds the known-evidence suite's cases: each case's shortcut classifier, the same recipe
without the shortcut (its clean accuracy is the yardstick), and the oracle facts in its card.

    python benchmarks/build_known_evidence.py --data ../shared/data            # every case
    python benchmarks/build_known_evidence.py --data ../shared/data --case isic2018_ink_resnet10t

For each case of ``medcam_fast.evaluation.suite.CASES``:

1. ``benchmarks/models/<case>.safetensors`` (+ card) by ``benchmarks/train_classifier.py`` with
   the case's recipe, unless it is there (``--retrain``: train anyway);
2. ``benchmarks/models/<case>_clean`` the same recipe without the shortcut, unless its card is
   there (``--retrain-clean``: train anyway; its weights stay out of git, its card is kept);
3. the oracle facts (``medcam_fast.evaluation.cases.oracle_facts``, the default MedCAMConfig's
   fills and margins) on every val and test case, written to the card's ``known_evidence``
   section (JSON) and its Markdown card.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_classifier  # noqa: E402

from conftest import cpu_model  # noqa: E402
from medcam_fast.data.shortcuts import area as mark_area, get_shortcut  # noqa: E402
from medcam_fast.evaluation.cases import oracle_facts  # noqa: E402
from medcam_fast.evaluation.suite import CASES, get_case, load_case, split_cases  # noqa: E402
from medcam_fast.evaluation.suite_report import case_card_markdown  # noqa: E402
from medcam_fast.medcam import MedCAMConfig  # noqa: E402


def train(argv: list[str]) -> float:
    t0 = time.time()
    print("train_classifier.py", " ".join(argv), flush=True)
    if train_classifier.main(argv) != 0:
        raise SystemExit(f"training failed: {argv}")
    return time.time() - t0


def accuracy(card: dict) -> dict:
    t = card["metrics"]["test"]
    return {"accuracy": t["accuracy"], "balanced_accuracy": t["balanced_accuracy"], "n": t["n"]}


def build(name: str, data: Path, models: Path, retrain: bool, retrain_clean: bool, threads: int) -> dict:
    spec = get_case(name)
    root = data / spec.dataset
    out, clean = models / spec.name, models / spec.clean_name
    seconds = {}
    if retrain or not out.with_suffix(".safetensors").is_file():
        seconds["shortcut"] = train(spec.train_argv(root, out) + ["--threads", str(threads)])
    if retrain_clean or not clean.with_suffix(".json").is_file():
        seconds["clean"] = train(spec.train_argv(root, clean, with_shortcut=False) + ["--threads", str(threads)])
    torch.set_num_threads(threads)
    model, prep, class_names, card = load_case(spec, models)
    clean_card = json.loads(clean.with_suffix(".json").read_text())
    cfg = MedCAMConfig()
    facts, t0 = {}, time.time()
    for split in ("val", "test"):
        cases = split_cases(spec, root, model, prep, class_names, split)
        o = oracle_facts(model, cases.x, cases.call, cases.gt, cfg, seed=0)
        facts[split] = {**cases.counts(), "oracle": o.summary(cases.flip_rate)}
        print(f"{spec.name} {split}: {json.dumps(facts[split])}", flush=True)
    shortcut = get_shortcut(spec.shortcut)
    size = spec.size
    with_mark, without = accuracy(card), accuracy(clean_card)
    card["known_evidence"] = {
        "case": spec.name, "recipe": spec.describe(), "normally_trained": spec.normally_trained,
        "shortcut": {"kind": spec.shortcut, "class": spec.target, "description": shortcut.description,
                     "area": mark_area(shortcut, size), "ground_truth_area": mark_area(shortcut, size, dilation=2)},
        "clean_accuracy": {"with_shortcut": with_mark, "same_recipe_without": without,
                           "difference_points": 100 * (with_mark["accuracy"] - without["accuracy"]),
                           "balanced_difference_points": 100 * (with_mark["balanced_accuracy"]
                                                                 - without["balanced_accuracy"]),
                           "clean_recipe_card": clean.with_suffix(".json").name},
        "cases": facts,
        "oracle_test": ("under the default MedCAMConfig's certified fills (blank, blur 5% and 15% of the side, the "
                        "image mean), keep margin min(0.25, half the call's lead), 16 random blobs per case at the "
                        "ground truth's area"),
        "cases_rule": "images of other classes called correctly whose call the mark flips to the shortcut's class; "
                      "test cases from the test split, val cases from the val split (disjoint images)",
        "note": spec.note,
        "built": {"machine": f"{cpu_model()}, {threads} threads",
                  "torch": torch.__version__, "oracle_seconds": round(time.time() - t0, 1),
                  "training_seconds": {k: round(v) for k, v in seconds.items()},
                  "date": time.strftime("%Y-%m-%d")},
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    out.with_suffix(".md").write_text(case_card_markdown(card))
    return card["known_evidence"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding brain_mri/, isic2018/")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="a case (repeatable; default: every one)")
    ap.add_argument("--models", default=str(ROOT / "benchmarks" / "models"))
    ap.add_argument("--retrain", action="store_true", help="train even where the classifier exists")
    ap.add_argument("--retrain-clean", action="store_true", help="train the recipe without the shortcut even where "
                    "its card exists")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    data = Path(args.data)
    for name in args.case or sorted(CASES):
        if not (data / get_case(name).dataset).is_dir():
            ap.error(f"no {get_case(name).dataset} data under {data}")
    for name in args.case or sorted(CASES):
        ke = build(name, data, Path(args.models), args.retrain, args.retrain_clean, args.threads)
        print(json.dumps({"case": name, "clean_accuracy": ke["clean_accuracy"],
                          "test": ke["cases"]["test"]["oracle"]}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

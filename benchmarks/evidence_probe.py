"""The evidence probe on brain_mri test images (medcam_fast.evaluation.probe): Grad-CAM's map,
random pixels, random blobs and the lesion grown by distance, cut to 1-70% of the image, each cut
kept with the rest blank / blurred and deleted (blank / blurred), split by whether the blank image
already gives the label. No explainer is fitted.

    python benchmarks/evidence_probe.py --data ../shared/data/brain_mri --classifier brain_mri_mobilenetv2 \
        --out benchmarks/results/evidence_probe_brain_mri_mobilenetv2

Writes ``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast.evaluation import load_split  # noqa: E402
from medcam_fast.evaluation import _load as load_classifier  # noqa: E402
from medcam_fast.evaluation.probe import (PROBE_AREAS, TESTS, exact_mask_kept, lesion_scores, probe,  # noqa: E402
                                          random_rankings, rates)

LABELS = {"kept_blank": "kept, rest blank", "kept_blur": "kept, rest blurred",
          "flipped_deleted_blank": "flipped, cut deleted (blank)", "flipped_deleted_blur": "flipped, cut deleted (blur)"}


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"


def table(group_rates: dict) -> list[str]:
    lines = ["| ranking | test | images | " + " | ".join(f"{a:.0%}" for a in PROBE_AREAS) + " |",
             "|---|---|---:|" + "---:|" * len(PROBE_AREAS)]
    for name, r in group_rates.items():
        for t in TESTS:
            lines.append(f"| {name} | {LABELS[t]} | {r['n']} | " + " | ".join(_pct(v) for v in r[t]) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the brain_mri folder (with split.csv)")
    ap.add_argument("--classifier", default="brain_mri_mobilenetv2")
    ap.add_argument("--weights-dir", default=None, help="folder of the classifier's card (default: the zoo)")
    ap.add_argument("--n", type=int, default=100, help="test images (seeded draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args(argv)

    from medcam_fast.baselines.gradcam import cam_maps

    t0 = time.time()
    model, prep, class_names, card = load_classifier(args.classifier, args.weights_dir)
    model.eval()
    x, lesion, ids, _ = load_split("brain_mri", args.data, "test", prep, args.n, args.seed)
    with torch.no_grad():
        label = model(x).argmax(1)
    rankings = {"Grad-CAM": cam_maps(model, x, label, method="gradcam"), **random_rankings(
        x.shape[0], tuple(x.shape[-2:]), args.seed), "lesion grown": lesion_scores(lesion)}
    with torch.no_grad():
        result = probe(model, x, label, rankings)
        lesion_kept = exact_mask_kept(model, x, label, lesion)
    null = result["null"]
    groups = {"non-null": ~null, "null": null}
    out = {"classifier": args.classifier, "n": len(ids), "ids": ids, "areas": list(PROBE_AREAS),
           "null_class": class_names[int(model(torch.zeros_like(x[:1])).argmax())],
           "rates": {g: rates(result, m) for g, m in groups.items()},
           "lesion_itself_kept_blank": {g: float(lesion_kept[m].float().mean()) if m.any() else float("nan")
                                        for g, m in groups.items()},
           "lesion_area_median": float(lesion.flatten(1).float().mean(1).median()),
           "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "seconds": time.time() - t0}
    i5 = PROBE_AREAS.index(0.05)
    nn_rates = out["rates"]["non-null"]
    headline = (f"Non-null images ({int((~null).sum())}): random 5% pixels keep the label (rest blank) for "
                f"{_pct(nn_rates['random pixels']['kept_blank'][i5])}, the lesion itself (median area "
                f"{out['lesion_area_median']:.1%}) for {_pct(out['lesion_itself_kept_blank']['non-null'])}, "
                f"Grad-CAM's top 5% for {_pct(nn_rates['Grad-CAM']['kept_blank'][i5])}.")
    out["headline"] = headline
    acc = card.get("metrics", {}).get("test", {}).get("accuracy", float("nan"))
    lines = [f"# Evidence probe: {args.classifier} on brain_mri", "",
             f"- {len(ids)} test images (seeded draw {args.seed}); classifier test accuracy {acc:.3f}; "
             f"the blank image is called '{out['null_class']}' ({int(null.sum())} images of that call are "
             "'null': an empty mask already keeps their label).",
             "- Rankings cut to each area by the package's top-k rule; blank = the model-space baseline 0, "
             "blur = 8x average-pooled and upsampled; 'lesion grown' ranks the lesion's core first, then "
             "pixels by distance to it.",
             f"- {out['machine']}; {out['seconds']:.0f} s.", "", f"**{headline}**", ""]
    for g in groups:
        lines += [f"## {g} images", ""] + table(out["rates"][g]) + [""]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    print(headline)
    print(f"wrote {path.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

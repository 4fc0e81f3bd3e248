"""Two checks of the two-sided default that the suite table does not make.

    python benchmarks/two_sided_checks.py --data ../shared/data      # `make two-sided-checks`

1. **Clean images**: on the suite's normally trained brain MRI classifiers, ``--n-clean`` clean
   test images each (no mark; a seeded draw of the test split), one image per call with the
   default config: the share of images with a certified fill that get ``ok`` on the sufficient
   side, on the necessary side, and on one or the other.
2. **Seconds per image at 128²**: on the dermoscopy case's classifier, ``--n-speed`` of its test
   cases, occlusion (12x12 window, stride 4, blur_fine fill: the suite's row) and the two-sided
   default, one image per call, alternating image by image in one process (so both see the same
   machine state), after one warm-up call of each.

Writes ``benchmarks/results/two_sided_checks.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast import Explainer, MedCAMConfig  # noqa: E402
from medcam_fast.baselines.perturbation import occlusion_maps  # noqa: E402
from medcam_fast.evaluation import load_split  # noqa: E402
from medcam_fast.evaluation.suite import CASES, get_case, load_case, split_cases, subset  # noqa: E402

CLEAN_CASES = ("brain_mri_tag_mobilenetv2_050", "brain_mri_text_convnext_atto", "brain_mri_text_vit")
SPEED_CASE = "isic2018_ink_resnet10t"


def clean_shares(name: str, data: Path, models: Path, n: int, seed: int) -> dict:
    """Statuses of the default two-sided explanation on ``n`` clean test images of case ``name``."""
    spec = get_case(name)
    model, prep, _, _ = load_case(spec, models)
    x, _, ids, _ = load_split(spec.dataset, data / spec.dataset, "test", prep, n, seed)
    explainer = Explainer(model, MedCAMConfig())
    rows = []
    for i in range(len(ids)):
        e = explainer(x[i:i + 1], seed=seed)
        rows.append({"id": ids[i], "status": e.status[0], "necessary_status": e.necessary_status[0],
                     "testable": e.status[0] != "null_keeps_label", "seconds": e.seconds})
        print(f"  {name} {ids[i]}: {e.status[0]} / {e.necessary_status[0]}", flush=True)
    testable = [r for r in rows if r["testable"]]
    share = (lambda f: sum(map(f, testable)) / len(testable)) if testable else (lambda f: float("nan"))
    return {"images": len(rows), "with_certified_fill": len(testable),
            "sufficient_ok": share(lambda r: r["status"] == "ok"),
            "necessary_ok": share(lambda r: r["necessary_status"] == "ok"),
            "either_ok": share(lambda r: "ok" in (r["status"], r["necessary_status"])), "rows": rows}


def speed(data: Path, models: Path, n: int, seed: int) -> dict:
    """Seconds per image of occlusion and of the two-sided default on ``n`` dermoscopy test cases."""
    spec = get_case(SPEED_CASE)
    model, prep, class_names, _ = load_case(spec, models)
    cases = subset(split_cases(spec, data / spec.dataset, model, prep, class_names, "test"), n, seed)
    explainer = Explainer(model, MedCAMConfig())
    runs = {"occlusion": lambda xi, yi: occlusion_maps(model, xi, yi, fill="blur_fine"),
            "Med-CAM two-sided default": lambda xi, yi: explainer(xi, target=yi, seed=seed)}
    times = {k: [] for k in runs}
    for k, fn in runs.items():   # warm-up
        fn(cases.x[:1], cases.call[:1])
    for i in range(len(cases.ids)):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn(cases.x[i:i + 1], cases.call[i:i + 1])
            times[k].append(time.perf_counter() - t)
    return {"size": list(cases.x.shape[-2:]), "images": len(cases.ids),
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "mean_seconds": {k: statistics.mean(v) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--models", default=str(ROOT / "benchmarks" / "models"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "two_sided_checks"))
    ap.add_argument("--n-clean", type=int, default=24, help="clean test images per brain MRI classifier")
    ap.add_argument("--n-speed", type=int, default=8, help="dermoscopy test cases timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, models, out = Path(args.data), Path(args.models), Path(args.out)
    assert all(c in CASES for c in CLEAN_CASES + (SPEED_CASE,))
    t0 = time.time()
    clean = {name: clean_shares(name, data, models, args.n_clean, args.seed) for name in CLEAN_CASES}
    timing = speed(data, models, args.n_speed, args.seed)
    command = "python benchmarks/two_sided_checks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Two-sided default: clean images and seconds per image", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today()}, {time.time() - t0:.0f} s. Default `MedCAMConfig` "
             f"(necessary side: `{MedCAMConfig().necessary}`), one image per call.", "",
             "## Clean test images (no mark) of the normally trained brain MRI classifiers", "",
             "| classifier | images | with a certified fill | sufficient ok | necessary ok | ok on one side or the other |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in clean.items():
        lines.append(f"| {name} | {r['images']} | {r['with_certified_fill']} | {100 * r['sufficient_ok']:.0f}% | "
                     f"{100 * r['necessary_ok']:.0f}% | {100 * r['either_ok']:.0f}% |")
    s = timing["seconds"]
    lines += ["", f"## Seconds per image at {timing['size'][0]}x{timing['size'][1]} ({SPEED_CASE}, "
              f"{timing['images']} test cases, alternating, median)", "",
              "| method | s / image (median) | s / image (mean) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {timing['mean_seconds'][k]:.2f} |" for k, v in s.items()]
    lines += ["", f"Ratio two-sided / occlusion: {s['Med-CAM two-sided default'] / s['occlusion']:.2f}."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"clean": clean, "speed": timing}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

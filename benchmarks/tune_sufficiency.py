"""Choosing the sufficiency test's and the fit's defaults where the answer is known: val images only.

    python benchmarks/tune_sufficiency.py --data ../shared/data/brain_mri --out benchmarks/results/tuning_sufficiency_val

Two val sets, never the test split:
- **tag**: known-evidence cases of the shortcut classifier ``brain_mri_tag_mobilenetv2`` on the
  val split (the tag flips the call and blanking it restores it; ground truth the tag + 2 px);
  scored by hit (the map's maximum on the tag), mask precision, area, status ok, random_pass.
- **demo**: brain_mri val images with the masking-robust demo classifier; scored by status ok,
  mean a* (smallest sufficient area of the ranking), area, random_pass and the status counts.

Every variation changes one setting of ``MedCAMConfig()``; one image per call is the default
(``--batch`` for batched calls). Rule: on tag, most hits, then highest precision; demo decides ties.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast import Explainer, MedCAMConfig, metrics, zoo  # noqa: E402
from medcam_fast.evaluation import _load as load_classifier, load_split  # noqa: E402
from medcam_fast.evaluation.tag_cases import brightest, build_tag_cases  # noqa: E402

VARIATIONS = [
    ("base", {}),
    ("issue-15 fit", dict(fit=dict(act=1.0, unet_scale=2, init_bias=2.0), priors=dict(area_weight=2.0, tv=2.0))),
    ("start from the whole image", dict(fit=dict(init_bias=2.0))),
    ("AM x5", dict(fit=dict(act=1.0))),
    ("TV x4", dict(priors=dict(tv=2.0))),
    ("area x0.5", dict(priors=dict(area_weight=2.0))),
    ("U-Net half resolution", dict(fit=dict(unet_scale=2))),
    ("objective dual", dict(objective="dual")),
    ("objective deletion", dict(objective="deletion")),
    ("keep_margin 0.5", dict(checks=dict(keep_margin=0.5))),
    ("blank and mean fills only", dict(fills=("baseline", "mean"))),
    ("+ impute fill", dict(checks=dict(mask_fills=("impute",), mode="full"))),
]


def _mean(v):
    v = [float(a) for a in v if a == a]
    return statistics.mean(v) if v else float("nan")


def score(res, gt, seconds) -> dict:
    """Per-variation figures of Explanations ``res`` against ground truth ``gt`` ``[N,H,W]``."""
    m = res.mask
    overlap = (m & gt).flatten(1).sum(1).float()
    precision = overlap / m.flatten(1).sum(1).clamp(min=1).float()
    return {
        "n": len(res), "ok": res.status.count("ok") / len(res),
        "hit": float(metrics.hit_rate(res.mask_logits, gt).nanmean()), "precision": float(precision.mean()),
        "area": float(res.area.mean()), "a_star": _mean(res.a_star.tolist()),
        "random_pass": _mean(res.random_pass.tolist()), "sufficient": float(res.sufficient.float().mean()),
        "flipped": float(res.flipped_when_removed.float().mean()),
        "status": {s: res.status.count(s) for s in sorted(set(res.status))}, "seconds_per_image": seconds / len(res),
        "steps": float(res.steps.float().mean()),
    }


def explain_all(model, x, cfg, batch: int):
    expl = Explainer(model, cfg)
    parts = [expl(x[i:i + batch], seed=0) for i in range(0, x.shape[0], batch)]
    cat = {}
    for k in ("mask", "ranking", "area", "a_star", "random_pass", "sufficient", "flipped_when_removed", "steps"):
        cat[k] = torch.cat([getattr(p, k) for p in parts])
    cat["status"] = sum((p.status for p in parts), [])
    return type("Res", (), {**cat, "__len__": lambda self: x.shape[0]})()


def tag_val(root, n: int):
    """The shortcut classifier and ``n`` of its val known-evidence cases (images, tag masks)."""
    model, prep, _, card = load_classifier("brain_mri_tag_mobilenetv2", ROOT / "benchmarks" / "models")
    tag = card["tag"]
    value = brightest(card["model"]["mean"], card["model"]["std"])
    xv, lv, idv, yv = load_split("brain_mri", root, "val", prep, None)
    cases = build_tag_cases(model, xv, yv, lv, idv, card["class_names"].index(tag["class"]), value, 0.0, 11)
    return model, cases.x[:n], cases.tag[:n]


def val_sets(data, n_tag: int, n_demo: int) -> dict:
    """``{"tag": (model, x, gt), "demo": (model, x, gt)}``: the two val sets."""
    sets = {"tag": tag_val(data, n_tag)}
    demo, prep, _ = zoo.load_demo()
    x, gt, _, _ = load_split("brain_mri", data, "val", prep, n_demo, seed=5)
    sets["demo"] = (demo, x, gt)
    return sets


def saved_results(out: Path) -> tuple[Path, dict]:
    """The JSON beside ``out`` and what it already holds (a rerun resumes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    return path, (json.loads(path.read_text()) if path.exists() else {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the brain_mri folder")
    ap.add_argument("--n-tag", type=int, default=24)
    ap.add_argument("--n-demo", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1, help="images per call (1: single-image calls)")
    ap.add_argument("--only", default=None, help="comma list of variation names")
    ap.add_argument("--out", default="benchmarks/results/tuning_sufficiency_val")
    args = ap.parse_args(argv)
    sets = val_sets(args.data, args.n_tag, args.n_demo)
    out = Path(args.out)
    path, results = saved_results(out)
    only = set(args.only.split(",")) if args.only else None
    for name, change in VARIATIONS:
        if only and name not in only:
            continue
        for set_name, (model, xs, gts) in sets.items():
            key = f"{name} | {set_name}"
            if key in results:
                continue
            cfg = MedCAMConfig().replace(**change)
            t0 = time.perf_counter()
            res = explain_all(model, xs, cfg, args.batch)
            results[key] = {"change": change, **score(res, gts, time.perf_counter() - t0)}
            print(key, json.dumps(results[key]), flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    head = ("| variation | set | n | hit | precision | area | a* | sufficient | random_pass | flipped when removed "
            "| ok | statuses | s / image |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for key, r in results.items():
        name, set_name = key.split(" | ")
        rows.append(f"| {name} | {set_name} | {r['n']} | {r['hit']:.0%} | {r['precision']:.0%} | {r['area']:.1%} | "
                    f"{r['a_star']:.1%} | {r['sufficient']:.0%} | {r['random_pass']:.2f} | {r['flipped']:.0%} | "
                    f"{r['ok']:.0%} | {', '.join(f'{k} {v}' for k, v in r['status'].items())} | "
                    f"{r['seconds_per_image']:.1f} |")
    text = (f"# Sufficiency-test and fit defaults on val images ({'single-image calls' if args.batch == 1 else f'batches of {args.batch}'})"
            "\n\ntag: val known-evidence cases of brain_mri_tag_mobilenetv2 (64², ground truth the tag + 2 px); "
            "demo: brain_mri val images, demo classifier (128², ground truth the tumour). "
            "Rule: on tag, most hits, then highest precision; demo decides ties.\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the fast-mode defaults were chosen: one-at-a-time variations around a base config, on
brain_mri **val** images with the demo classifier (never the test split).

    python benchmarks/tune_defaults.py --data ../shared/data/brain_mri --n 12 --pool 48 \
        --out benchmarks/results/tuning_brain_mri_val

For every config: the share of explanations with status "ok" (kept, counterfactually
sufficient, not degenerate), kept, mean kept_robust, mean and median area, degenerate share,
hit rate and IoU against the tumour masks, and seconds per image (batched call).
Rule: most "ok", then smallest mean area among ok, then fewest seconds.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast import Explainer, MedCAMConfig, metrics, zoo  # noqa: E402
from medcam_fast.evaluation import load_split  # noqa: E402

VARIATIONS = [
    ("base", {}),
    ("no activation matching", dict(fit=dict(lambda_am=0.0))),
    ("AM x3", dict(fit=dict(lambda_am=3.0))),
    ("robustness x0.5", dict(fit=dict(rob=1.0))),
    ("robustness x2.5", dict(fit=dict(rob=5.0))),
    ("area x4", dict(priors=dict(area_weight=8.0))),
    ("TV x4", dict(priors=dict(tv=8.0))),
    ("KL off", dict(fit=dict(kl=0.0))),
    ("keep_prob 0.8", dict(fit=dict(keep_prob=0.8))),
    ("U-Net full resolution", dict(fit=dict(unet_scale=1))),
    ("U-Net 1/4 resolution", dict(fit=dict(unet_scale=4))),
    ("paper's hard threshold", dict(fit=dict(binarize="threshold"))),
    ("plain CE", dict(fit=dict(ce_mode="plain"))),
    ("100 steps", dict(steps=100)),
]


def score(res, gt, seconds) -> dict:
    ok = [i for i, s in enumerate(res.status) if s == "ok"]
    areas = res.area.tolist()
    return {
        "ok": len(ok) / len(res), "kept": float(res.kept_on_baseline.float().mean()),
        "kept_robust": float(res.kept_robust.nanmean()),
        "mean_area_ok": statistics.mean(areas[i] for i in ok) if ok else float("nan"),
        "median_area": statistics.median(areas), "degenerate": sum(a < 0.005 or a > 0.9 for a in areas) / len(res),
        "hit": float(metrics.hit_rate(res.soft_mask, gt).nanmean()), "iou": float(metrics.iou(res.mask, gt).nanmean()),
        "seconds_per_image": seconds / len(res), "status": {s: res.status.count(s) for s in set(res.status)},
        "mean_steps": float(res.steps.float().mean()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--only", default=None, help="comma list of variation names")
    ap.add_argument("--out", default="benchmarks/results/tuning_brain_mri_val")
    args = ap.parse_args(argv)
    model, prep, _ = zoo.load_demo()
    x, gt, ids, _ = load_split("brain_mri", args.data, "val", prep, args.n, seed=5)
    pool, _, _, _ = load_split("brain_mri", args.data, "val", prep, args.pool, seed=6, skip=ids)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    only = set(args.only.split(",")) if args.only else None
    for name, change in VARIATIONS:
        if (only and name not in only) or name in results:
            continue
        cfg = MedCAMConfig(checks=dict(batch_as_counterfactuals=False)).replace(**change)
        t0 = time.perf_counter()
        res = Explainer(model, cfg, counterfactuals=pool)(x, seed=0)
        results[name] = {"change": change, **score(res, gt, time.perf_counter() - t0)}
        print(name, json.dumps(results[name]), flush=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| variation | change | ok | kept | kept_robust | mean area (ok) | median area | degenerate | hit | IoU "
            "| s / image | steps |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['change'] or '-'} | {r['ok']:.0%} | {r['kept']:.0%} | {r['kept_robust']:.2f} | "
                    f"{r['mean_area_ok']:.1%} | {r['median_area']:.1%} | {r['degenerate']:.0%} | {r['hit']:.0%} | "
                    f"{r['iou']:.3f} | {r['seconds_per_image']:.1f} | {r['mean_steps']:.0f} |")
    best = max(results, key=lambda k: (results[k]["ok"], -results[k]["mean_area_ok"]
                                       if results[k]["mean_area_ok"] == results[k]["mean_area_ok"] else -1,
                                       -results[k]["seconds_per_image"]))
    text = (f"# Choosing the fast-mode defaults (brain_mri val, {len(ids)} images, {pool.shape[0]} val images as "
            f"counterfactual backgrounds, demo classifier)\n\nBase: `MedCAMConfig()` at the time of the run. "
            f"Rule: most status ok, then smallest mean area among ok, then speed. Best: **{best}**.\n\n"
            + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

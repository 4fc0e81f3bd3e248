"""The step budget and the early-stopping rule, measured on val against the sufficiency test:

    python benchmarks/tune_steps.py --data ../shared/data/brain_mri --out benchmarks/results/tuning_steps_val

The same two val sets as ``tune_sufficiency.py`` (tag known-evidence cases; demo-classifier val
images), in batches of 8. Each variation changes the budget (``steps``, with the annealing phase a
fixed share of it) or the stopping rule (``patience``, ``plateau``, ``min_steps``). A variation
is at equal quality when, on both sets, status ok is at most 2 points below base and mean area at
most 2 points above it (and on tag, hit at most 2 points below); the cheapest such variation in
mean steps wins.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from medcam_fast import MedCAMConfig  # noqa: E402
from tune_sufficiency import explain_all, saved_results, score, val_sets  # noqa: E402

VARIATIONS = [
    ("base", {}),
    ("steps 100", dict(steps=100)),
    ("steps 80", dict(steps=80, fit=dict(min_steps=40))),
    ("patience 2", dict(fit=dict(patience=2))),
    ("plateau 0.1", dict(fit=dict(plateau=0.1))),
    ("steps 100, patience 2", dict(steps=100, fit=dict(patience=2))),
]
TOLERANCE = 0.02


def equal_quality(r: dict, base: dict, set_name: str) -> bool:
    """Not worse than base by more than 2 points: status ok, mean area (and hit, on tag)."""
    worse = {"ok": base["ok"] - r["ok"], "area": r["area"] - base["area"], "hit": base["hit"] - r["hit"]}
    keys = ("ok", "area", "hit") if set_name == "tag" else ("ok", "area")
    return all(worse[k] <= TOLERANCE + 1e-9 for k in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the brain_mri folder")
    ap.add_argument("--n-tag", type=int, default=24)
    ap.add_argument("--n-demo", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/tuning_steps_val")
    args = ap.parse_args(argv)
    sets = val_sets(args.data, args.n_tag, args.n_demo)
    out = Path(args.out)
    path, results = saved_results(out)
    for name, change in VARIATIONS:
        for set_name, (model, xs, gts) in sets.items():
            key = f"{name} | {set_name}"
            if key in results:
                continue
            t0 = time.perf_counter()
            res = explain_all(model, xs, MedCAMConfig().replace(**change), args.batch)
            results[key] = {"change": change, **score(res, gts, time.perf_counter() - t0)}
            print(key, json.dumps(results[key]), flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| variation | set | n | mean steps | ok | area | hit | precision | a* | random_pass | statuses | "
            "equal quality | s / image |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for key, r in results.items():
        name, set_name = key.split(" | ")
        same = equal_quality(r, results[f"base | {set_name}"], set_name)
        rows.append(f"| {name} | {set_name} | {r['n']} | {r['steps']:.0f} | {r['ok']:.0%} | {r['area']:.1%} | "
                    f"{r['hit']:.0%} | {r['precision']:.0%} | {r['a_star']:.1%} | {r['random_pass']:.2f} | "
                    f"{', '.join(f'{k} {v}' for k, v in r['status'].items())} | {'yes' if same else 'no'} | "
                    f"{r['seconds_per_image']:.1f} |")
    text = (f"# Step budget and early stopping on val images (batches of {args.batch})\n\n"
            "Equal quality: status ok and mean area (and hit, on tag) not worse than base by more than 2 points "
            "on both sets. "
            "tag: val known-evidence cases of brain_mri_tag_mobilenetv2 (64²); demo: brain_mri val images, "
            "demo classifier (128²).\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

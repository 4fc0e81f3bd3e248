"""Does the shortcut audit find the planted shortcut by itself? Every shortcut classifier of the
known-evidence suite, on an archive of its flipped cases (marked images of other classes that the
mark turns into the shortcut's class) mixed with as many clean images of the same split.

    python benchmarks/audit_suite.py --data ../shared/data --out benchmarks/results/audit_suite

Per case and split (the radial features and the ring criterion were chosen on val archives of the
five cases, 24 flipped cases and 72 clean images each; the figures are the test split's, the
default): the default two-sided explanation of every image in batches of 16
(``Explainer``, one process), the evidence maps of ``medcam_fast.audit.evidence_maps``, the
audit with the lesion masks and nothing about the mark, then, against the planted cases:
the purity and recall of the flagged clusters together, and of the single flagged cluster that holds
the most cases ("its own cluster"). Writes ``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast import Explainer, MedCAMConfig  # noqa: E402
from medcam_fast.audit import audit, evidence_maps  # noqa: E402
from medcam_fast.evaluation import load_split  # noqa: E402
from medcam_fast.evaluation.suite import CASES, get_case, load_case, split_cases, subset  # noqa: E402


def _scores(members: set, planted: set) -> tuple[float, float]:
    hit = len(members & planted)
    return (hit / len(members) if members else float("nan")), (hit / len(planted) if planted else float("nan"))


def run(name: str, data: Path, models: Path, split: str, n_cases: int, n_clean: int, seed: int, batch: int) -> dict:
    spec = get_case(name)
    model, prep, class_names, _ = load_case(spec, models)
    root = data / spec.dataset
    cases = subset(split_cases(spec, root, model, prep, class_names, split), n_cases, seed)
    xc, lc, idc, _ = load_split(spec.dataset, root, split, prep, n_clean, seed + 5, skip=cases.ids)
    x, lesion = torch.cat([cases.x, xc]), torch.cat([cases.lesion, lc])
    planted = set(range(len(cases.ids)))
    explainer = Explainer(model, MedCAMConfig(), device="cpu")
    t0 = time.perf_counter()
    results, labels = [], []
    for b in range(0, len(x), batch):
        e = explainer(x[b:b + batch], seed=seed)
        labels += e.label.tolist()
        results += [SimpleNamespace(id=str(b + j), mask=e.mask[j].numpy(), necessary_mask=e.necessary_mask[j].numpy())
                    for j in range(len(e))]
    seconds = time.perf_counter() - t0
    res = audit(evidence_maps(results), np.array(labels), list(class_names), lesion.numpy(), seed=seed)
    flagged = res.flagged()
    members = {int(m) for c in flagged for m in c.members}
    purity, recall = _scores(members, planted)
    best = max(flagged, key=lambda c: len(planted & set(map(int, c.members))), default=None)
    own = _scores(set(map(int, best.members)), planted) if best is not None else (float("nan"), 0.0)
    target = class_names.index(spec.target)
    return {"case": name, "split": split, "images": len(x), "planted": len(planted), "clean": len(idc),
            "clusters": len(res.clusters), "flagged_clusters": len(flagged), "flagged_images": len(members),
            "purity": purity, "recall": recall, "own_purity": own[0], "own_recall": own[1],
            "own_class": None if best is None else class_names[best.class_index],
            "target": spec.target, "called_target": int(sum(1 for v in labels if v == target)),
            "reasons": [f"{class_names[c.class_index]} ({len(c.members)}): {c.reason}" for c in flagged],
            "seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=ROOT / "benchmarks" / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit_suite")
    ap.add_argument("--cases", default=None, help="comma list (default: every case with a classifier)")
    ap.add_argument("--splits", default="test", help="comma list of val, test")
    ap.add_argument("--n-cases", type=int, default=24)
    ap.add_argument("--n-clean", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = args.cases.split(",") if args.cases else [n for n in CASES if (args.models / f"{n}.safetensors").is_file()]
    rows = []
    for name in names:
        for split in args.splits.split(","):
            rows.append(run(name, args.data, args.models, split, args.n_cases, args.n_clean, args.seed, args.batch))
            r = rows[-1]
            print(f"{name} {split}: flagged {r['flagged_clusters']} cluster(s), purity {r['purity']:.2f} recall "
                  f"{r['recall']:.2f}; own cluster {r['own_purity']:.2f} / {r['own_recall']:.2f} ({r['seconds']} s)",
                  flush=True)
    command = "python benchmarks/audit_suite.py " + " ".join(sys.argv[1:])
    lines = ["# The shortcut audit on the known-evidence suite", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}.", "",
             "Archive per case and split: the flipped cases (marked, called as the shortcut's class) and as many "
             "clean images; default two-sided explanations; the audit sees the maps, the calls and the lesion "
             "masks, nothing about the mark. Purity / recall of the flagged images against the planted cases; "
             "own cluster: the one flagged cluster holding the most cases.", "",
             "| case | split | images (planted) | clusters | flagged | purity | recall | own cluster purity | "
             "own cluster recall | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['split']} | {r['images']} ({r['planted']}) | {r['clusters']} | "
                     f"{r['flagged_clusters']} | {r['purity']:.2f} | {r['recall']:.2f} | {r['own_purity']:.2f} | "
                     f"{r['own_recall']:.2f} | {r['seconds']} |")
    lines += ["", "## Flagged clusters", ""]
    for r in rows:
        lines += [f"- {r['case']} ({r['split']}): " + ("; ".join(r["reasons"]) or "none")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every method on every case of the known-evidence suite, in one run per case, into one table.

    python benchmarks/known_evidence_suite.py --data ../shared/data \
        --out benchmarks/results/known_evidence_suite          # `make known-evidence-suite`

For each case (``medcam_fast.evaluation.suite.CASES``, classifiers in ``benchmarks/models``):
``--n-test`` test cases (a seeded draw), one image per call, scored by the harness
(``medcam_fast.evaluation.Evaluation``, the sufficiency test of every method, curve metrics off)
against the mark and against the lesion: occlusion, RISE and integrated gradients with the blank
and the blur_fine fill, the Grad-CAM family, Med-CAM's default (two-sided: the preservation
fit's sufficient side and the necessary side, each scored on its own ranking) and its deletion and
dual objectives (the sufficient side alone). Classifier passes are counted at the head.
CAM thresholds are tuned on ``--n-val`` val cases (val split: disjoint images). Resumable: records
stay in ``<out>/<case>/records.jsonl``. Writes ``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast.evaluation import EvalOptions, Evaluation  # noqa: E402
from medcam_fast.evaluation.suite import (CASES, add_suite_arguments, case_eval_set, get_case,  # noqa: E402
                                          load_case, read_card)
from medcam_fast.evaluation.suite_report import (ROW_NAMES, SUITE_METHODS, method_row, oracle_line,  # noqa: E402
                                                 suite_table)


def run_case(name: str, data: Path, models: Path, out: Path, n_test: int, n_val: int, methods, seed: int) -> dict:
    spec = get_case(name)
    model, prep, class_names, card = load_case(spec, models)
    ds, test, val = case_eval_set(spec, data / spec.dataset, model, prep, class_names, n_test, n_val, seed)
    opt = EvalOptions(methods=tuple(methods), batch=1, seed=seed, curve_metrics=False, warm_up=True)
    t0 = time.time()
    ev = Evaluation(model, ds, out / name, opt,
                    progress=lambda m, k: print(f"  {name} {m} +{k}", flush=True))
    resumed = sum(1 for (m, i) in ev.done if m in methods and i in set(ds.ids))
    records = ev.run(opt.methods)
    by_method = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    return {"rows": {m: method_row(by_method[m]) for m in methods if by_method.get(m)},
            "scored": len(ds.ids), "test_cases": test.counts(), "val_cases": len(val.ids),
            "seconds": round(time.time() - t0), "resumed": resumed, "card": card.get("known_evidence")}


def write(results: dict, out: Path, command: str) -> None:
    lines = ["# The known-evidence suite: every method on every case", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {datetime.date.today()}. One image per call; the test cases of each "
             "case are a seeded draw of its test-split cases; CAM thresholds tuned on its val cases (val split).", "",
             "## The cases and their oracle facts (all test cases of each case, from its card)", "",
             "| case | recipe | clean test accuracy (without the shortcut) | test cases | oracle facts |",
             "|---|---|---|---:|---|"]
    for name, r in results.items():
        ke = r["card"]
        if not ke:
            lines.append(f"| {name} | (no known_evidence section in its card: run build_known_evidence.py) | | | |")
            continue
        acc = ke["clean_accuracy"]
        lines.append(f"| {name} | {ke['recipe']} | {acc['with_shortcut']['accuracy']:.3f} "
                     f"({acc['same_recipe_without']['accuracy']:.3f}, {acc['difference_points']:+.1f} points) | "
                     f"{ke['cases']['test']['cases']} | {oracle_line(ke['cases']['test']['oracle'])} |")
    lines += ["", "## Every method on every case", "",
              "hit: the map's maximum on the mark (grown by 2 px); precision at GT area: the share of the map's top "
              "pixels, at the mark's own area, that lie on it; lesion hit and precision: the same against the lesion "
              "mask (at the lesion's area); mask precision and area: Med-CAM's binary mask; status ok and random_pass: "
              "Med-CAM's own verdict and its random-blob control; passes: classifier passes per image (counted at "
              "the head; scoring not included); seconds per image, one image per call. Med-CAM's default is two-sided: "
              "its row is the sufficient side (the preservation fit), and the row below it the necessary side, "
              "scored the same way on its own ranking and mask (the smallest region whose removal loses the call), "
              "with its own status and random control (random regions of its area removed); passes and seconds are "
              "the two sides together (the same on both rows). The deletion and dual rows are the sufficient "
              "side alone.", "",
              suite_table({n: r["rows"] for n, r in results.items()}), "",
              "Run time per case in this process (all methods, scoring included): "
              + ", ".join(f"{n} {r['seconds']} s ({r['scored']} cases" + (
                  f"; {r['resumed']} records read back from an earlier process (a resumed or partial rerun), "
                  "their time not included" if r.get("resumed") else "") + ")" for n, r in results.items()) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(ap, ROOT, "known_evidence_suite", n_val=8)
    ap.add_argument("--methods", default=",".join(SUITE_METHODS), help=f"comma list (rows: {', '.join(ROW_NAMES)})")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    names = args.case or list(CASES)
    for name in names:
        read_card(get_case(name), args.models)   # fail early on a missing classifier
        if not (data / get_case(name).dataset).is_dir():
            ap.error(f"no {get_case(name).dataset} data under {data}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = {}
    for name in names:
        print(f"== {name}", flush=True)
        results[name] = run_case(name, data, Path(args.models), out, args.n_test, args.n_val, methods, args.seed)
        write(results, out, "python benchmarks/known_evidence_suite.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

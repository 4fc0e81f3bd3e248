"""The leave-one-case-out table of the known-evidence suite: a Med-CAM setting chosen on the val
cases of the other cases, scored on the left-out case's test cases.

    python benchmarks/known_evidence_loco.py --data ../shared/data \
        --out benchmarks/results/known_evidence_loco          # `make known-evidence-loco`

Two tables, one per side (``--side``): the sufficient side's settings
(``medcam_fast.evaluation.loco.SETTINGS``: objectives and weights) and the necessary side's
sources (``NECESSARY_SETTINGS``), each scored on its own side's ranking. Every setting runs on
``--n-val`` val cases of every case (val split only: this is the tuning); the score is the hit
rate (the ranking's maximum on the mark), ties broken by precision at the mark's area
(``--val-only`` stops there: the tuning data alone). Then only the chosen settings run on
test cases (the same seeded draw of ``--n-test`` as the suite table); a setting that is one of the
suite's Med-CAM rows reads the suite's records of the same cases (``--suite-dir``) instead of
running again. Resumable: records stay under ``<out>/val/`` and ``<out>/test/``. Writes
``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast.evaluation import EvalOptions, EvalSet, Evaluation  # noqa: E402
from medcam_fast.evaluation.loco import NECESSARY_SETTINGS, SETTINGS, leave_one_case_out, needed_test_runs  # noqa: E402
from medcam_fast.evaluation.suite import (CASES, add_suite_arguments, case_eval_set, get_case,  # noqa: E402
                                          load_case)
from medcam_fast.evaluation.suite_report import method_row  # noqa: E402
from medcam_fast.medcam import MedCAMConfig  # noqa: E402


# settings that are rows of the suite table (known_evidence_suite.py): same config, same cases
SUITE_ROWS = {"preservation": "medcam", "deletion": "medcam_deletion", "dual": "medcam_dual"}
# the two tables: which settings, and which side of a record they are scored on
SIDES = {"sufficient": (SETTINGS, lambda row: row), "necessary": (NECESSARY_SETTINGS, lambda row: row["necessary"])}


def _slug(setting: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in setting)


def suite_row_of(setting: str, overrides: dict) -> str | None:
    """The suite row whose config is ``setting``'s (the default row when the overrides are the defaults)."""
    if MedCAMConfig(**overrides) == MedCAMConfig():
        return "medcam"
    return SUITE_ROWS.get(setting)


def suite_records(suite_dir: Path | None, case: str, method: str | None, ids: list[str]) -> list[dict] | None:
    """The suite run's records of row ``method`` on exactly the cases ``ids``, or None."""
    if suite_dir is None or method is None:
        return None
    path = suite_dir / case / "records.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = {r["id"]: r for r in rows if r["method"] == method}
    return [rows[i] for i in ids] if all(i in rows for i in ids) else None


def score(model, data: EvalSet, out: Path, setting: str, overrides: dict, seed: int) -> dict:
    """Med-CAM with ``overrides`` on ``data`` (one image per call): its suite row."""
    opt = EvalOptions(methods=("medcam",), batch=1, seed=seed, curve_metrics=False, warm_up=True,
                      medcam=MedCAMConfig(**overrides))
    records = Evaluation(model, data, out / _slug(setting), opt).run(("medcam",))
    return method_row(records)


def side_table(side: str, settings: dict, names, loaded, val_sets, args, out: Path, suite_dir) -> tuple[list, dict]:
    """One side's tuning (val) and leave-one-case-out (test): Markdown lines and the JSON part."""
    pick = SIDES[side][1]
    val_rows = {s: {} for s in settings}
    for name in names:
        model, _ = loaded[name]
        for setting, overrides in settings.items():
            print(f"val {name} / {setting}", flush=True)
            val_rows[setting][name] = score(model, val_sets[name], out / "val" / name, setting, overrides, args.seed)
    val_hit = {s: {c: pick(r)["hit"] for c, r in rows.items()} for s, rows in val_rows.items()}
    val_prec = {s: {c: pick(r)["precision_at_gt_area"] for c, r in rows.items()} for s, rows in val_rows.items()}
    test_rows: dict[str, dict] = {s: {} for s in settings}
    reused = []
    for setting, name in sorted(needed_test_runs(val_hit, val_prec) if not args.val_only else ()):
        model, ds = loaded[name]
        records = suite_records(suite_dir, name, suite_row_of(setting, settings[setting]), ds.ids)
        if records is not None:
            reused.append(f"{name} / {setting}")
            test_rows[setting][name] = method_row(records)
            continue
        print(f"test {name} / {setting}", flush=True)
        test_rows[setting][name] = score(model, ds, out / "test" / name, setting, settings[setting], args.seed)
    test_hit = {s: {c: pick(r)["hit"] for c, r in rows.items()} for s, rows in test_rows.items()}
    rows = [] if args.val_only else leave_one_case_out(val_hit, test_hit, val_prec)
    lines = [f"## The {side} side", "", "Settings: " + "; ".join(f"**{s}** {v or '(the defaults)'}"
                                                           for s, v in settings.items())
             + f". Scored on the {side} side's ranking. Test scores read from the suite's records: "
             + (", ".join(reused) or "none") + ".", "",
             "### Val hit rate and precision at the mark's area of every setting (the tuning data)", "",
             "| setting | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1)]
    for s in settings:
        cells = [f"{100 * val_hit[s][c]:.0f}% / {val_prec[s][c]:.2f}" for c in names]
        mean_hit = sum(val_hit[s][c] for c in names) / len(names)
        mean_prec = sum(val_prec[s][c] for c in names) / len(names)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {100 * mean_hit:.0f}% / {mean_prec:.2f} |")
    lines += ["", "### Leave-one-case-out", "",
              "| left-out case | chosen on the others' val | its test hit | all-cases choice | its test hit | "
              "left-out minus all-cases |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.chosen} | {100 * r.test:.0f}% | {r.all_cases} | {100 * r.all_cases_test:.0f}% "
                     f"| {100 * r.gap:+.0f} points |")
    return lines + [""], {"val": val_rows, "test": test_rows, "loco": [r.__dict__ for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(ap, ROOT, "known_evidence_loco", n_val=12)
    ap.add_argument("--suite-dir", default=str(ROOT / "benchmarks" / "results" / "known_evidence_suite"),
                    help="the suite run's records, reused for the settings that are its rows ('' : never)")
    ap.add_argument("--side", action="append", choices=sorted(SIDES),
                    help="repeatable; default both: the sufficient side's settings, then the necessary side's sources")
    ap.add_argument("--val-only", action="store_true", help="the tuning data only: no test runs, no table")
    args = ap.parse_args(argv)
    args.side = args.side or ["sufficient", "necessary"]
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    names = args.case or list(CASES)
    if len(names) < 3:
        ap.error("leave-one-case-out needs at least 3 cases")
    t0 = time.time()
    loaded, val_sets = {}, {}
    for name in names:
        spec = get_case(name)
        model, prep, class_names, _ = load_case(spec, args.models)
        ds, test, val = case_eval_set(spec, data / spec.dataset, model, prep, class_names, args.n_test, args.n_val,
                                      args.seed)
        val_sets[name] = EvalSet(f"{name}_val", val.x, val.ids, val.gt, ds.pool, gt_lesion=val.lesion)
        loaded[name] = (model, ds)
    suite_dir = Path(args.suite_dir) if args.suite_dir else None
    body, parts = [], {}
    for side in args.side:
        lines, parts[side] = side_table(side, SIDES[side][0], names, loaded, val_sets, args, out, suite_dir)
        body += lines
    command = "python benchmarks/known_evidence_loco.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Leave-one-case-out: Med-CAM settings chosen on other cases' val cases", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {datetime.date.today()}, {time.time() - t0:.0f} s. "
             f"Each side's setting is chosen by its hit rate on {args.n_val} val cases per case (mean over cases; "
             f"ties: precision at the mark's area), and scored on {args.n_test} test cases of the left-out case. "
             "One image per call.", ""] + body
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(parts, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The adaptive checks against the full test, on val images: the same decisions, in how many passes.

    python benchmarks/adaptive_checks_val.py --data ../shared/data      # `make adaptive-checks-val`

For every suite case (``--n-val`` seeded val cases each, the val split: no test image is read)
and for clean brain MRI val images with the demo classifier at 128² (``--n-clean``), one
default explanation (``checks="full"``) gives both sides' rankings; then both rules check those
same rankings, under the same certified fills. Per side: the share of images where the adaptive
rule reaches the full test's status, its sufficiency decision (sufficient / the call lost with the
region removed) and the same mask; the median classifier passes per image of each rule (counted
at the classifier's head), and the checks' seconds. Writes
``benchmarks/results/adaptive_checks_val.{md,json}``.
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
from medcam_fast.evaluation import load_split  # noqa: E402
from medcam_fast.evaluation.suite import CASES, add_suite_arguments, get_case, load_case, split_cases, subset  # noqa: E402
from medcam_fast.medcam import sufficiency  # noqa: E402
from medcam_fast.models.freeze import frozen  # noqa: E402
from medcam_fast.models.passes import PassCounter  # noqa: E402
from medcam_fast.zoo import load_demo  # noqa: E402

SIDES = ("sufficient", "necessary")


def compare(model, x: torch.Tensor, seed: int = 0) -> dict:
    """Both rules on the rankings of one default explanation of ``x`` ``[N,C,H,W]``: per image and
    side, the two rules' status, decision, mask, passes; and each rule's seconds."""
    cfg = MedCAMConfig(checks=dict(mode="full"))
    ref = Explainer(model, cfg)(x, seed=seed)
    out = {"n": x.shape[0], "rules": {}}
    with torch.no_grad(), frozen(model):
        label = ref.label
        logits_x = model(x)
        fills = sufficiency.certify(model, x, label, cfg.fills, cfg.baseline, cfg.checks.certify_margin, cfg.max_batch)
        need = sufficiency.required_margin(sufficiency.margins(logits_x, label), cfg.checks.keep_margin,
                                           cfg.checks.keep_share)
        for checks in ("full", "adaptive"):
            e = Explainer(model, cfg.replace(checks=dict(mode=checks)), forward=model)
            t = time.perf_counter()
            with PassCounter(model) as counter:
                suff, nec = e._check(x, label, ref.mask_logits[:, None], ref.necessary_logits[:, None], fills, None,
                                     need, seed)
            seconds = time.perf_counter() - t
            statuses = [sufficiency_status(e, suff, fills, i) for i in range(x.shape[0])]
            out["rules"][checks] = {
                "seconds": seconds, "counted_passes": counter.images,
                "sufficient": {"status": statuses, "decision": suff["sufficient"].tolist(), "mask": suff["mask"],
                               "passes": suff["check_passes"].tolist()},
                "necessary": {"status": nec["status"], "decision": nec["flipped"].tolist(), "mask": nec["mask"],
                              "passes": nec["check_passes"].tolist()}}
    return out


def sufficiency_status(explainer, verdict: dict, fills, i: int) -> str:
    """The sufficient side's status of image ``i``, by the Explainer's rule."""
    from medcam_fast.medcam.verify import status_of

    return status_of(bool(verdict["sufficient"][i]), bool(verdict["testable"][i]), float(verdict["random_pass"][i]),
                     float(verdict["area"][i]), explainer.config, ", ".join(fills.names),
                     fills.described(i, verdict["use"]))[0]


def summarise(r: dict) -> dict:
    full, ad = r["rules"]["full"], r["rules"]["adaptive"]
    row = {"n": r["n"], "seconds_full": full["seconds"], "seconds_adaptive": ad["seconds"],
           "counted_full": full["counted_passes"] / r["n"], "counted_adaptive": ad["counted_passes"] / r["n"]}
    for side in SIDES:
        f, a = full[side], ad[side]
        row[side] = {
            "status": sum(u == v for u, v in zip(f["status"], a["status"])),
            "decision": sum(u == v for u, v in zip(f["decision"], a["decision"])),
            "mask": int((f["mask"] == a["mask"]).flatten(1).all(1).sum()),
            "ok_full": f["status"].count("ok"), "ok_adaptive": a["status"].count("ok"),
            "passes_full": f["passes"], "passes_adaptive": a["passes"],
            "disagree": [(i, u, v) for i, (u, v) in enumerate(zip(f["status"], a["status"])) if u != v]}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(ap, ROOT, "adaptive_checks_val", n_val=20)
    ap.add_argument("--n-clean", type=int, default=16, help="clean brain MRI val images (the demo classifier)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = {}
    for name in args.case or list(CASES):
        spec = get_case(name)
        model, prep, class_names, _ = load_case(spec, args.models)
        val = subset(split_cases(spec, Path(args.data) / spec.dataset, model, prep, class_names, "val"), args.n_val,
                     args.seed)
        rows[name] = summarise(compare(model, val.x, args.seed))
        print(name, {k: v for k, v in rows[name].items() if k not in SIDES}, flush=True)
    if args.n_clean:
        model, prep, _ = load_demo()
        x, _, _, _ = load_split("brain_mri", Path(args.data) / "brain_mri", "val", prep, args.n_clean, args.seed)
        rows["brain_mri clean (demo classifier, 128²)"] = summarise(compare(model.eval(), x, args.seed))
    lines = table(rows, args, time.time() - t0, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


def table(rows: dict, args, seconds: float, argv) -> list[str]:
    command = "python benchmarks/adaptive_checks_val.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Adaptive checks against the full test, on val images", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today()}, {seconds:.0f} s. The same rankings (one default explanation per batch) "
             "checked by both rules under the same certified fills. Agreement: the adaptive rule's status, "
             "decision (sufficient; necessary: the call lost with the region removed) and mask equal the full "
             "test's. Passes: classifier passes per image of that side's checks, median (max).", "",
             "| images | n | side | same status | same decision | same mask | ok (full / adaptive) | "
             "passes adaptive | passes full | checks s / image (adaptive / full, both sides) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = {s: [0, 0, 0, 0, []] for s in SIDES}
    for name, r in rows.items():
        for side in SIDES:
            s = r[side]
            pa = s["passes_adaptive"]
            total[side][0] += s["status"]
            total[side][1] += s["decision"]
            total[side][2] += s["mask"]
            total[side][3] += r["n"]
            total[side][4] += pa
            lines.append(f"| {name} | {r['n']} | {side} | {s['status'] / r['n']:.0%} | {s['decision'] / r['n']:.0%} "
                         f"| {s['mask'] / r['n']:.0%} | {s['ok_full']} / {s['ok_adaptive']} | "
                         f"{statistics.median(pa):.0f} ({max(pa)}) | {statistics.median(s['passes_full']):.0f} | "
                         f"{r['seconds_adaptive'] / r['n']:.2f} / {r['seconds_full'] / r['n']:.2f} |")
    for side in SIDES:
        st, de, ma, n, pa = total[side]
        lines.append(f"| **all** | {n} | {side} | **{st / n:.1%}** | **{de / n:.1%}** | {ma / n:.0%} | | "
                     f"**{statistics.median(pa):.0f}** ({max(pa)}) | | |")
    dis = [(name, side, d) for name, r in rows.items() for side in SIDES for d in r[side]["disagree"]]
    lines += ["", "Disagreements (image, full, adaptive): " + ("; ".join(f"{n} {s} {d}" for n, s, d in dis) or "none")]
    return lines


if __name__ == "__main__":
    sys.exit(main())

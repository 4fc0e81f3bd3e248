"""The amortised explainer against the per-image fit, on brain_mri test images, in one run:

    python benchmarks/evaluate_amortised.py --data ../shared/data/brain_mri --n 100 \
        --out benchmarks/results/amortised_brain_mri

The demo classifier and its bundled explainer (``medcam_fast.zoo.DEMO_EXPLAINER``, or
``--explainer``); the harness's seeded draw of test images. Rows: the per-image fit, the
amortised masks (one pass + the same checks), and ``--refine`` warm-started fits; each with the
status-ok rate, mean area, sufficient rate and seconds per image (batched calls of ``--batch``).
Then the wrong-label pass rate and the network's forward alone (images/s), and the targets of
issue 18 as measured.
"""
import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast import MedCAMConfig, zoo  # noqa: E402
from medcam_fast.amortised import explainer_figures, load  # noqa: E402
from medcam_fast.evaluation import load_split  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def targets(fig: dict, refine: int) -> list[tuple[str, str, bool]]:
    rows = fig["rows"]
    fit, one, ref = rows["fit"], rows["amortised"], rows[f"amortised+refine{refine}"]
    speed = fit["seconds_per_image"] / one["seconds_per_image"]
    pass_speed = fig["mask_pass_per_second"] * fit["seconds_per_image"]
    ref_speed = fit["seconds_per_image"] / ref["seconds_per_image"]
    return [
        (">= 100x the fit's explanations/s (checked masks)", f"{speed:.1f}x", speed >= 100),
        ("(the network's pass alone, no checks)", f"{pass_speed:.0f}x", pass_speed >= 100),
        ("one pass: status ok within 10 pts of the fit", f"{one['ok']:.1%} vs {fit['ok']:.1%}", one["ok"] >= fit["ok"] - 0.10),
        ("one pass: mean area <= 1.25x the fit's", f"{one['area']:.1%} vs {fit['area']:.1%}",
         one["area"] <= 1.25 * fit["area"]),
        # as written, "matches" is two-sided: a refine far above the fit is reported as a miss, with its sign
        (f"refine={refine}: status ok within 2 pts", f"{ref['ok']:.1%} vs {fit['ok']:.1%} "
         f"({100 * (ref['ok'] - fit['ok']):+.1f} pts)", abs(ref["ok"] - fit["ok"]) <= 0.02),
        (f"refine={refine}: area within 1.1x", f"{ref['area']:.1%} vs {fit['area']:.1%}",
         ref["area"] <= 1.1 * fit["area"]),
        (f"refine={refine}: >= 5x the fit's speed", f"{ref_speed:.1f}x", ref_speed >= 5),
        ("wrong labels pass <= 5%", f"{fig['wrong_label_pass']:.1%}", fig["wrong_label_pass"] <= 0.05),
    ]


def markdown(fig: dict, refine: int, facts: list[str]) -> str:
    lines = ["# Amortised explainer against the per-image fit (brain_mri test)", ""] + [f"- {f}" for f in facts]
    lines += ["", "| | status ok | mean area | sufficient | s / image | statuses |", "|---|---:|---:|---:|---:|---|"]
    for name, r in fig["rows"].items():
        lines.append(f"| {name} | {r['ok']:.1%} | {r['area']:.1%} | {r['sufficient']:.1%} | "
                     f"{r['seconds_per_image']:.3f} | {', '.join(f'{k} {v}' for k, v in r['status'].items())} |")
    lines += ["", f"Wrong labels ((y+1) mod K, amortised): {fig['wrong_label_pass']:.1%} pass the sufficiency test. "
              f"The network's forward alone: {fig['mask_pass_per_second']:.0f} images/s (batch {fig['batch']}).",
              "", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(fig, refine)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the brain_mri folder (split.csv)")
    ap.add_argument("--explainer", default=str(zoo.DEMO_EXPLAINER))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--refine", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="results path without suffix (.md and .json are written)")
    args = ap.parse_args()
    model, prep, _ = zoo.load_demo()
    x, _, ids, _ = load_split("brain_mri", args.data, "test", prep, args.n, args.seed)
    amortised = load(args.explainer)
    fig = explainer_figures(model, amortised, x, MedCAMConfig(), refine=(args.refine,), batch=args.batch,
                            seed=args.seed)
    facts = [f"classifier {zoo.DEMO}, explainer {Path(args.explainer).name} (trained "
             f"{amortised.card['recipe']['steps']} steps, {amortised.card['training'].get('seconds', '?')} s)",
             f"{len(ids)} test images (the harness's seeded draw {args.seed}), calls of {args.batch}, default MedCAMConfig",
             f"machine: {_cpu_name()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; one job at a time"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"facts": facts, **fig}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(fig, args.refine, facts))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How stable is the sufficiency decision? Candidate rules measured on brain_mri **val** (demo
classifier) and on the planted task of the tests.

    python benchmarks/sufficiency_rule.py --data ../shared/data/brain_mri --n 24 \
        --out benchmarks/results/sufficiency_rule_val

For every image the default fit runs with three seeds. Each fit's binary candidates (the 0.5
mask and the top-a% pixels, as ``explain`` makes them) are pasted onto ``--kmax`` counterfactual
images of other labels (the same draws for every seed), and the classifier's answers are kept,
through torch and through onnxruntime (another implementation of the same network: rounding
differences of the kind another CPU gives). A rule (K composites, a threshold) then picks a
candidate exactly as ``explain`` does, and we count how often its pick changes when only
(a) the K composites are another draw, (b) the forward is onnxruntime's, (c) the fit's seed
changes; and what it costs in area.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from medcam_fast import MedCAMConfig, zoo  # noqa: E402
from medcam_fast.evaluation import load_split  # noqa: E402
from medcam_fast.medcam import explainer as explainer_mod  # noqa: E402
from medcam_fast.medcam.verify import Sufficiency, choose  # noqa: E402

RULES = {  # name: (K composites, kept_robust threshold)
    "K=8, >= 0.9 (before)": (8, 0.9),
    "K=16, >= 0.9": (16, 0.9),
    "K=16, >= 0.85": (16, 0.85),
    "K=32, >= 0.9": (32, 0.9),
    "K=32, >= 0.85": (32, 0.85),
}


def capture_fit(model, x, reference, cfg, seed):
    """Runs explain and returns (label [N], candidate masks [N,M,H,W]) of its fit."""
    seen = {}
    real = explainer_mod.check_candidates

    def spy(forward, xx, label, masks, *args):
        seen.update(label=label, masks=masks)
        return real(forward, xx, label, masks, *args)

    explainer_mod.check_candidates = spy
    try:
        explainer_mod.Explainer(model, cfg, reference=reference)(x, seed=seed)
    finally:
        explainer_mod.check_candidates = real
    return seen["label"], seen["masks"]


@torch.no_grad()
def answers(forward, x, label, masks, backgrounds, baseline, batch=64):
    """kept on the baseline [N,M] and composite answers kept [N,M,K] for ``backgrounds`` [N,K,C,H,W]."""
    n, m_count = masks.shape[:2]
    mf = masks.float().unsqueeze(2)
    ev = (mf * x[:, None] + (1 - mf) * baseline).flatten(0, 1)
    base = torch.cat([forward(ev[i:i + batch]) for i in range(0, ev.shape[0], batch)]).view(n, m_count, -1)
    kept_base = base.argmax(-1) == label[:, None]
    k = backgrounds.shape[1]
    comp_kept = torch.empty(n, m_count, k, dtype=torch.bool)
    comp_prob = torch.empty(n, m_count, k)
    for j in range(m_count):
        mj = mf[:, j, None]
        comp = (mj * x[:, None] + (1 - mj) * backgrounds).flatten(0, 1)
        out = torch.cat([forward(comp[i:i + batch]) for i in range(0, comp.shape[0], batch)]).view(n, k, -1)
        comp_kept[:, j] = out.argmax(-1) == label[:, None]
        comp_prob[:, j] = out.softmax(-1).gather(2, label.view(n, 1, 1).expand(n, k, 1))[..., 0]
    return kept_base, comp_kept, comp_prob


def draw_backgrounds(pool, pool_labels, label, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for y in label.tolist():
        ok = (pool_labels != y).nonzero().flatten()
        ok = ok[torch.randperm(ok.numel(), generator=gen)]
        out.append(pool[ok[torch.arange(k) % ok.numel()]])
    return torch.stack(out)


def collect(model, forwards, x, reference, pool, cfg, seeds, kmax, cache: Path):
    """Per seed: candidate masks and every forward's answers (cached in ``cache``)."""
    if cache.exists():
        return torch.load(cache)
    with torch.no_grad():
        pool_labels = model(pool).argmax(1)
    runs = []
    for seed in seeds:
        label, masks = capture_fit(model, x, reference, cfg, seed)
        bgs = draw_backgrounds(pool, pool_labels, label, kmax)
        run = {"seed": seed, "masks": masks, "area": masks.flatten(2).float().mean(2)}
        for name, fwd in forwards.items():
            run[name] = answers(fwd, x, label, masks, bgs, cfg.baseline)
        runs.append(run)
        print(f"  seed {seed} collected", flush=True)
    torch.save(runs, cache)
    return runs


def pick(run, forward, k, threshold, offset, cfg):
    kept_base, comp, _ = run[forward]
    kr = comp[:, :, offset:offset + k].float().mean(2)
    suff = Sufficiency(kept_base, torch.zeros_like(kr), kr)
    idx, _ = choose(run["masks"], [], suff, cfg.replace(robust_threshold=threshold))
    area = run["area"].gather(1, idx[:, None])[:, 0]
    sufficient = (kept_base & (kr >= threshold)).gather(1, idx[:, None])[:, 0]
    return idx, area, sufficient


def analyse(runs, cfg, kmax):
    rows = {}
    for name, (k, thr) in RULES.items():
        draw_changes, ort_changes, seed_changes, seed_jumps, areas, found = [], [], [], [], [], []
        for run in runs:
            idx, area, suff = pick(run, "torch", k, thr, 0, cfg)
            areas += area.tolist()
            found += suff.tolist()
            if 2 * k <= kmax:
                idx2, _, _ = pick(run, "torch", k, thr, k, cfg)
                draw_changes += (idx2 != idx).tolist()
            idx_ort, _, _ = pick(run, "ort", k, thr, 0, cfg)
            ort_changes += (idx_ort != idx).tolist()
        picks = [pick(run, "torch", k, thr, 0, cfg)[1] for run in runs]
        for a in range(len(picks)):
            for b in range(a + 1, len(picks)):
                d = (picks[a] - picks[b]).abs()
                seed_changes += (d > 1e-6).tolist()
                seed_jumps += (d > 0.2).tolist()
        rows[name] = {
            "K": k, "threshold": thr,
            "draw_change": statistics.mean(draw_changes) if draw_changes else float("nan"),
            "ort_change": statistics.mean(ort_changes),
            "seed_change": statistics.mean(seed_changes) if seed_changes else float("nan"),
            "seed_jump": statistics.mean(seed_jumps) if seed_jumps else float("nan"),
            "median_area": statistics.median(areas), "mean_area": statistics.mean(areas),
            "sufficient": statistics.mean(found),
        }
    return rows


def table(rows, title):
    out = [f"### {title}", "",
           "| rule | pick changes: other draw | pick changes: onnxruntime | area changes: other seed | "
           "area jumps > 20 points: other seed | sufficient found | median area | mean area |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        dc = "-" if math.isnan(r["draw_change"]) else f"{r['draw_change']:.1%}"
        out.append(f"| {name} | {dc} | {r['ort_change']:.1%} | {r['seed_change']:.1%} | {r['seed_jump']:.1%} | "
                   f"{r['sufficient']:.0%} | {r['median_area']:.1%} | {r['mean_area']:.1%} |")
    return "\n".join(out) + "\n"


def export_ort(model, x, path):
    from medcam_fast.onnx import OrtClassifier, export_classifier

    export_classifier(model, x[:2], path)
    return OrtClassifier(path, providers="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="brain_mri folder (skipped without it)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--pool", type=int, default=128)
    ap.add_argument("--kmax", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/sufficiency_rule_val")
    ap.add_argument("--cache", default=None, help="folder for the raw answers (re-analyse without refitting)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = MedCAMConfig(batch_as_reference=False)
    cache = Path(args.cache) if args.cache else out.parent / "json"
    cache.mkdir(parents=True, exist_ok=True)
    sections, record = [], {}

    from planted import make_planted, train_tiny_cnn
    model = train_tiny_cnn(seed=0)
    x, _, _ = make_planted(20, seed=11, positive_only=True)
    xr, yr, _ = make_planted(400, seed=9)
    neg = xr[yr == 0]
    forwards = {"torch": model, "ort": export_ort(model, x, out.with_name("planted.onnx"))}
    print("planted task", flush=True)
    runs = collect(model, forwards, x, neg[:16], neg[16:16 + args.kmax], cfg, args.seeds, args.kmax,
                   cache / "sufficiency_planted.pt")
    record["planted"] = analyse(runs, cfg, args.kmax)
    sections.append(table(record["planted"], f"Planted task of the tests ({x.shape[0]} images, 16 reference "
                                              f"images, {args.kmax} composites, seeds {args.seeds})"))

    if args.data:
        model, prep, _ = zoo.load_demo()
        x, _, ids, _ = load_split("brain_mri", args.data, "val", prep, args.n, seed=5)
        pool, _, _, _ = load_split("brain_mri", args.data, "val", prep, args.pool, seed=6, skip=ids)
        reference = pool[:64]
        forwards = {"torch": model, "ort": export_ort(model, x, out.with_name("demo.onnx"))}
        print("brain_mri val", flush=True)
        runs = collect(model, forwards, x, reference, pool[64:], cfg, args.seeds, args.kmax,
                       cache / "sufficiency_brain_mri.pt")
        record["brain_mri_val"] = analyse(runs, cfg, args.kmax)
        sections.append(table(record["brain_mri_val"], f"brain_mri val, demo classifier ({x.shape[0]} images, 64 "
                                                        f"val reference images for the fit, composites on "
                                                        f"{pool.shape[0] - 64} other val images, seeds {args.seeds})"))
    for f in ("planted.onnx", "demo.onnx"):
        out.with_name(f).unlink(missing_ok=True)
    text = "# Sufficiency rule: how often the pick changes\n\n" + __doc__.split("\n\n", 2)[2] + "\n" + \
        "\n".join(sections)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

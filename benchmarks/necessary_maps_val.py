"""The necessary side's ranking maps on the suite's val cases: which map finds the mark, at what cost.

    python benchmarks/necessary_maps_val.py --data ../shared/data      # `make necessary-maps-val`

Every map removes pixels under each image's removal fill (its certified fill of lowest margin
alone, as :mod:`medcam_fast.medcam.necessary` does) and scores the drop of the label's margin.
Compared: the coarse-to-fine occlusion map at several grids (the default's, 4/8/16/32 cells, and
the one before it, 4/8/16), dense occlusion (window 3/32 of the side at stride 1/32 or 2/32, the
mean drop of the windows holding a pixel) and RISE-style random removals (``kept - removed``
mean margins). Val split only (``--n-val`` seeded cases per case): this is tuning data. Scores:
hit (the map's maximum on the mark grown by 2 px), precision of the top pixels at the mark's area,
classifier passes and seconds per image. Writes ``benchmarks/results/necessary_maps_val.md``.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast.baselines.perturbation import occlusion_geometry, rise_masks  # noqa: E402
from medcam_fast.evaluation.runner import _precision_at_area  # noqa: E402
from medcam_fast.evaluation.suite import CASES, add_suite_arguments, get_case, load_case, split_cases, subset  # noqa: E402
from medcam_fast.medcam import MedCAMConfig, sufficiency  # noqa: E402
from medcam_fast.medcam.necessary import _removal_fill, coarse_to_fine_occlusion  # noqa: E402
from medcam_fast.medcam.verify import batched_logits  # noqa: E402
from medcam_fast.metrics.localisation import hit_rate  # noqa: E402
from medcam_fast.models.freeze import frozen  # noqa: E402
from medcam_fast.models.passes import PassCounter  # noqa: E402


@torch.no_grad()
def dense_occlusion(forward, x, label, fill, stride_cells: int = 1) -> torch.Tensor:
    """``[N,H,W]``: the mean margin drop of the windows (3/32 of the side, stride ``stride_cells``/32) holding a pixel."""
    n, _, h, w = x.shape
    win, st = occlusion_geometry(min(h, w))
    st *= stride_cells
    base = sufficiency.margins(forward(x), label)
    pos = [(r, c) for r in range(0, h - win + 1, st) for c in range(0, w - win + 1, st)]
    m = torch.zeros(len(pos), 1, h, w, dtype=x.dtype, device=x.device)
    for j, (r, c) in enumerate(pos):
        m[j, 0, r:r + win, c:c + win] = 1
    out = torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        logits = batched_logits(forward, (1 - m) * x[i:i + 1] + m * fill[i:i + 1], 64)
        drop = base[i] - sufficiency.margins(logits, label[i].expand(len(pos)))
        out[i] = (drop[:, None, None] * m[:, 0]).sum(0) / m[:, 0].sum(0).clamp(min=1)
    return out


@torch.no_grad()
def removal_rise(forward, x, label, fill, n_masks: int = 250, seed: int = 0) -> torch.Tensor:
    """``[N,H,W]``: mean margin with a pixel kept minus with it removed, over ``n_masks`` RISE masks."""
    n, _, h, w = x.shape
    keep = rise_masks(n_masks, (h, w), 8, 0.5, torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    out = []
    for i in range(n):
        k = keep[:, None]
        v = sufficiency.margins(batched_logits(forward, k * x[i:i + 1] + (1 - k) * fill[i:i + 1], 100),
                                label[i].expand(n_masks))
        kept = (v[:, None, None] * keep).sum(0) / keep.sum(0).clamp(min=1e-6)
        removed = (v[:, None, None] * (1 - keep)).sum(0) / (1 - keep).sum(0).clamp(min=1e-6)
        out.append(kept - removed)
    return torch.stack(out)


MAPS = {
    "coarse-to-fine 4/8/16 (before)": lambda f, x, y, r: coarse_to_fine_occlusion(f, x, y, r, levels=(4, 8, 16)),
    "coarse-to-fine 4/8/16/32 (default)": lambda f, x, y, r: coarse_to_fine_occlusion(f, x, y, r),
    "coarse-to-fine 8/16/32, keep 2": lambda f, x, y, r: coarse_to_fine_occlusion(f, x, y, r, levels=(8, 16, 32),
                                                                                 keep=2),
    "coarse-to-fine 4/8/16/32/64": lambda f, x, y, r: coarse_to_fine_occlusion(f, x, y, r, levels=(4, 8, 16, 32, 64)),
    "dense occlusion, stride 2/32": lambda f, x, y, r: dense_occlusion(f, x, y, r, 2),
    "dense occlusion, stride 1/32": lambda f, x, y, r: dense_occlusion(f, x, y, r, 1),
    "random removals (RISE masks), 250": lambda f, x, y, r: removal_rise(f, x, y, r),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(ap, ROOT, "necessary_maps_val", n_val=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, t0 = MedCAMConfig(), time.time()
    names = args.case or list(CASES)
    table = {}
    for name in names:
        spec = get_case(name)
        model, prep, class_names, _ = load_case(spec, args.models)
        val = subset(split_cases(spec, Path(args.data) / spec.dataset, model, prep, class_names, "val"), args.n_val,
                     args.seed)
        with frozen(model):
            fills = sufficiency.certify(model, val.x, val.call, cfg.fills, cfg.baseline, cfg.checks.certify_margin)
            fill = _removal_fill(fills)
            for label, fn in MAPS.items():
                t = time.perf_counter()
                with PassCounter(model) as counter:
                    score = fn(model, val.x, val.call, fill)
                seconds = (time.perf_counter() - t) / len(val.ids)
                table.setdefault(label, {})[name] = (hit_rate(score, val.gt).float().mean().item(),
                                                     _precision_at_area(score, val.gt).nanmean().item(),
                                                     counter.images / len(val.ids), seconds)
                print(name, label, table[label][name], flush=True)
    command = "python benchmarks/necessary_maps_val.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# The necessary side's ranking maps on val cases", "",
             f"`{command}`; {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today()}, {time.time() - t0:.0f} s. {args.n_val} val cases per case (val split), "
             "each image's removal fill. Cells: hit / precision at the mark's area / passes per image / seconds "
             "per image.", "", "| map | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, cells in table.items():
        lines.append(f"| {label} | " + " | ".join("{:.0%} / {:.2f} / {:.0f} / {:.2f}".format(*cells[n]) for n in names)
                     + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU targets in one table: the two-sided checked default on ResNet-18 at 224² alone and
batched, the amortised path, and (from bm_speed's JSON) the fit step's modes and the service.

    python benchmarks/gpu_targets.py --device cuda --speed-json $OUT/json/speed_cuda.json --out $OUT/gpu_targets

Rows measured here, each after an untimed warm-up call: ResNet-18 (random init, 3 classes) at
224², the two-sided default with the adaptive checks, one image per call (median of ``--alone``
calls) and ``--n`` images in one call; ``skip_untestable=False``, since with random weights a fill
alone often gives the label and the skipped images would time nothing (such images still get only
the 2 plain passes of checks: the passes column says how many ran). The amortised path: the
demo classifier with its bundled amortised explainer, two-sided and checked, ``--n`` images (its
128² samples repeated). Targets (issue 29): at most 0.25 s per image alone, at least 60 images/s
batched. ``--speed-json``: bm_speed.py's results (eager / compiled / CUDA-graph steps, fp32 / bf16,
the service under 16 clients) become rows of the same table. Runs on CPU too (``--device cpu``,
small ``--n``) so the script is checked where no GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import sync  # noqa: E402
from medcam_fast import Explainer, MedCAMConfig  # noqa: E402
from medcam_fast.data import samples  # noqa: E402
from medcam_fast.zoo import DEMO_EXPLAINER, load_demo  # noqa: E402


def timed(explainer, x, device) -> tuple[float, object]:
    t = time.perf_counter()
    res = explainer(x, seed=0)
    sync(device)
    return time.perf_counter() - t, res


def measure(device: str, n: int, alone: int, size: int, steps: int | None) -> list[dict]:
    """The rows measured here: ResNet-18 alone and batched, the amortised path batched."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval().to(device)
    x = torch.randn(max(n, alone), 3, size, size, device=device)
    cfg = MedCAMConfig(checks=dict(skip_untestable=False))
    if steps is not None:
        cfg = cfg.replace(steps=steps, fit=dict(min_steps=steps))
    explainer = Explainer(model, cfg)
    explainer(x[:1])   # warm-up: classifier path, allocator, autotuning
    rows = []
    one = [timed(explainer, x[i:i + 1], device) for i in range(alone)]
    s = statistics.median(t for t, _ in one)
    rows.append({"row": f"two-sided default, ResNet-18 {size}², one image per call", "s_per_image": s,
                 "images_per_s": 1 / s, "target": "<= 0.25 s / image",
                 "passes": statistics.median(int(r.check_passes[0] + r.necessary_check_passes[0]) for _, r in one)})
    t, res = timed(explainer, x[:n], device)
    rows.append({"row": f"two-sided default, ResNet-18 {size}², {n} images per call", "s_per_image": t / n,
                 "images_per_s": n / t, "target": ">= 60 images / s",
                 "passes": float((res.check_passes + res.necessary_check_passes).float().median())})
    demo, prep, _ = load_demo()
    xs = torch.stack([prep(s.path) for s in samples()]).to(device)
    xs = xs.repeat((n + xs.shape[0] - 1) // xs.shape[0], 1, 1, 1)[:n]
    amortised = Explainer(demo.to(device), MedCAMConfig(), amortised=DEMO_EXPLAINER)
    amortised(xs[:1])
    t, res = timed(amortised, xs, device)
    rows.append({"row": f"amortised (demo classifier, 128²), two-sided, {n} images per call", "s_per_image": t / n,
                 "images_per_s": n / t, "target": "-",
                 "passes": float((res.check_passes + res.necessary_check_passes).float().median())})
    return rows


def speed_rows(path: Path) -> list[dict]:
    """bm_speed.py's fit-step and service rows from its pytest-benchmark JSON."""
    rows = []
    for b in json.loads(path.read_text())["benchmarks"]:
        e = b.get("extra_info", {})
        if e.get("kind") == "fit_step":
            rows.append({"row": f"fit step {e['model']} {e['size']}², {e['mode']} {e['precision']}, N={e['n']}",
                         "s_per_image": e["ms_per_image_step"] / 1e3, "images_per_s": None, "target": "-",
                         "passes": None, "unit": "s per image-step"})
        elif "seconds" in e:
            rows.append({"row": f"service: {b['name'].split('[')[-1].rstrip(']')} (16 requests)",
                         "s_per_image": e["seconds"] / 16, "images_per_s": 16 / e["seconds"], "target": "-",
                         "passes": None})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--alone", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=None, help="fixed fit steps (default: the config's)")
    ap.add_argument("--speed-json", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = measure(args.device, args.n, args.alone, args.size, args.steps)
    if args.speed_json and Path(args.speed_json).is_file():
        rows += speed_rows(Path(args.speed_json))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"# GPU targets: {name}, torch {torch.__version__}", "",
             "| row | s / image | images / s | classifier passes of the checks / image (median) | target |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        passes = "-" if r["passes"] is None else f"{r['passes']:.0f}"
        unit = f" ({r['unit']})" if r.get("unit") else ""
        lines.append(f"| {r['row']} | {r['s_per_image']:.4f}{unit} | {ips} | {passes} | {r['target']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

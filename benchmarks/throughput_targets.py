"""Seconds per image of the default explanation, batched and one by one, the amortised path beside
the fit, and an older checkout's one-sided default: ratios measured in one run.

    python benchmarks/throughput_targets.py --baseline /tmp/medcam_old      # `make throughput-targets`

The demo classifier on its 8 bundled samples at 128², 2 threads, one torch job at a time (the
baseline runs in a subprocess after the rest, never beside it). Rows: the two-sided default (fit,
adaptive checks) batched and one by one, the same with ``checks="full"``, the amortised explainer
(the bundled one) checked on both sides, and with ``--baseline PATH`` (a checkout of older code,
its extension built or copied in) that code's one-sided default (``necessary=None``) batched.
Each row is timed ``--rounds`` times after one untimed warm-up call; the table keeps each round.
Writes ``benchmarks/results/throughput_targets.{md,json}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402

EXPLAINER = ROOT / "medcam_fast" / "zoo" / "weights" / "brain_mri_mobilenetv2_explainer.safetensors"

# run by this file and, with --baseline, by the older checkout (whose API may lack newer options)
TIMER = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.data import samples
from medcam_fast.models.passes import PassCounter
from medcam_fast.zoo import load_demo
model, prep, _ = load_demo()
x = torch.stack([prep(s.path) for s in samples()])
rows = json.loads(sys.argv[2])
out = {}
for name, spec in rows.items():
    kw = {"amortised": spec["amortised"]} if spec.get("amortised") else {}
    e = Explainer(model, MedCAMConfig(**spec["config"]), **kw)
    e(x[:1], seed=0)   # warm-up: the classifier path, allocator
    rounds = []
    for _ in range(int(sys.argv[3])):
        with PassCounter(model) as c:
            t = time.perf_counter()
            if spec["batched"]:
                r = [e(x, seed=0)]
            else:
                r = [e(x[i:i + 1], seed=0) for i in range(x.shape[0])]
            rounds.append((time.perf_counter() - t) / x.shape[0])
    st = [s for p in r for s in p.status]
    nst = [s for p in r for s in (p.necessary_status or [])]
    out[name] = {"seconds": rounds, "passes": c.images / x.shape[0], "ok": st.count("ok"),
                 "necessary_ok": nst.count("ok"), "n": x.shape[0]}
    print(name, out[name], file=sys.stderr, flush=True)
print(json.dumps(out))
'''


def run_timer(rows: dict, threads: int, rounds: int, path: Path | None = None) -> dict:
    """The timer over ``rows`` in a fresh process (``path``: an older checkout first on sys.path)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    proc = subprocess.run([sys.executable, "-c", TIMER, str(threads), json.dumps(rows), str(rounds)],
                          capture_output=True, text=True, env=env, cwd=str(path or ROOT))
    if proc.returncode:
        raise RuntimeError(f"timer failed ({path or ROOT}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="a checkout of older code (its medcam_fast importable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput_targets"))
    args = ap.parse_args(argv)
    rows = {
        "two-sided default (fit), batched": {"config": {}, "batched": True},
        "two-sided default (fit), one by one": {"config": {}, "batched": False},
        "two-sided, checks='full', batched": {"config": {"checks": {"mode": "full"}}, "batched": True},
        "one-sided (necessary=None), batched": {"config": {"necessary": None}, "batched": True},
        "two-sided, skip_untestable=False, batched": {"config": {"checks": {"skip_untestable": False}}, "batched": True},
        "amortised, two-sided, batched": {"config": {}, "batched": True, "amortised": str(EXPLAINER)},
        "amortised, two-sided, checks='full', batched": {"config": {"checks": {"mode": "full"}}, "batched": True,
                                                         "amortised": str(EXPLAINER)},
        "amortised, two-sided, necessary='shared' (no occlusion map), batched": {
            "config": {"necessary": "shared"}, "batched": True, "amortised": str(EXPLAINER)},
        "amortised, one-sided, batched": {"config": {"necessary": None}, "batched": True,
                                          "amortised": str(EXPLAINER)},
    }
    t0 = time.time()
    res = run_timer(rows, args.threads, args.rounds)
    if args.baseline:
        old = {"older checkout: one-sided default, batched": {"config": {"necessary": None}, "batched": True},
               "older checkout: two-sided default, batched": {"config": {}, "batched": True}}
        res.update(run_timer(old, args.threads, args.rounds, Path(args.baseline)))
    best = {k: min(v["seconds"]) for k, v in res.items()}
    fit = best["two-sided default (fit), batched"]
    lines = ["# Seconds per image: the default, the amortised path and an older checkout, in one run", "",
             f"`python benchmarks/throughput_targets.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
             f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, {datetime.date.today()}, "
             f"{time.time() - t0:.0f} s. The demo classifier, its 8 samples at 128², seed 0; each round after a "
             "warm-up call; passes: classifier passes per image (counted at the head, the last round). "
             + (f"Older checkout: `{args.baseline}`." if args.baseline else ""), "",
             "| row | s / image (each round) | passes / image | ok (sufficient / necessary) | "
             "throughput against the fit-based default |", "|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {' / '.join(f'{s:.2f}' for s in r['seconds'])} | {r['passes']:.0f} | "
                     f"{r['ok']} / {r['necessary_ok']} of {r['n']} | {fit / best[name]:.1f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

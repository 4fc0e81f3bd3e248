"""What a dying worker costs: the same job with and without one fault, on a local Ray cluster.

    python benchmarks/fault_recovery.py --out benchmarks/results/fault_recovery

The tests' tiny classifier (torch.export, 64²) and planted images as PNGs. Ray Data: ``--n`` images,
2 workers, batches of 4; in the faulty run one worker exits (``os._exit``) halfway through its first
batch and Ray restarts it. Serve: ``--n`` requests to 2 replicas; in the faulty run one replica is
killed (SIGKILL) a second after the requests went out and the client resends. Each pair counts lost
and duplicated ids (the targets: none) and the extra seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import cpu_model  # noqa: E402
from medcam_fast import MedCAMConfig  # noqa: E402
from medcam_fast.distributed import ExplainWorker, ModelSpec  # noqa: E402
from planted import make_planted, train_tiny_cnn  # noqa: E402

CFG = MedCAMConfig(steps=40, fit=dict(min_steps=40, check_every=10))


class ExitsOnce(ExplainWorker):
    MARKER = ""

    def explain_arrays(self, x, ids, seed=None):
        try:
            os.rename(self.MARKER, self.MARKER + ".taken")
        except FileNotFoundError:
            return super().explain_arrays(x, ids, seed)
        super().explain_arrays(x[: len(ids) // 2], ids[: len(ids) // 2], seed)
        os._exit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fault_recovery")
    args = ap.parse_args()
    import ray
    from PIL import Image
    from ray import cloudpickle, serve

    from medcam_fast.distributed import ServeClient, explain_dataset, read_results, serve_explainer

    tmp = Path(tempfile.mkdtemp())
    program = torch.export.export(train_tiny_cnn(seed=0), (torch.zeros(2, 1, 64, 64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(tmp / "tiny.pt2"))
    spec = ModelSpec(str(tmp / "tiny.pt2"), size=(64, 64), mean=(0.4,), std=(0.4,), device="cpu")
    x, _, _ = make_planted(args.n, seed=7)
    u = ((x[:, 0] * 0.4 + 0.4).clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    paths = []
    for i in range(args.n):
        paths.append(tmp / f"img{i:03d}.png")
        Image.fromarray(u[i]).save(paths[-1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []

    def check(ids, expected) -> dict:
        return {"lost": len(set(expected) - set(ids)), "duplicated": len(ids) - len(set(ids))}

    for fault in (False, True):
        marker = tmp / f"die{int(fault)}"
        if fault:
            marker.touch()
        ExitsOnce.MARKER = str(marker)
        t0 = time.perf_counter()
        explain_dataset(paths, spec, tmp / f"data{int(fault)}", CFG, workers=2, batch=4, progress=False,
                        worker_cls=ExitsOnce)
        secs = time.perf_counter() - t0
        ids = [r.id for r in read_results(tmp / f"data{int(fault)}")]
        rows.append({"job": "Ray Data", "fault": fault, "seconds": secs, "died": (tmp / f"die{int(fault)}.taken").exists(),
                     **check(ids, map(str, paths))})
    pre = ExplainWorker(spec, CFG).preprocess
    xs = [pre(p) for p in paths]
    for fault in (False, True):
        name = f"serve{int(fault)}"
        handle = serve_explainer(spec, CFG, replicas=2, max_batch=4, name=name)
        pids = {handle.info.remote().result(timeout_s=60)["pid"] for _ in range(20)}
        with ServeClient(handle, retries=5) as client:
            t0 = time.perf_counter()
            futures = [client.submit(xi, id=str(i)) for i, xi in enumerate(xs)]
            if fault:
                time.sleep(1.0)
                os.kill(sorted(pids)[0], signal.SIGKILL)
            results = [f.result(timeout=600) for f in futures]
            secs = time.perf_counter() - t0
        serve.delete(name)
        rows.append({"job": "Ray Serve", "fault": fault, "seconds": secs, "died": fault, "resent": client.resent,
                     **check([r.id for r in results if r.error is None], map(str, range(len(xs))))})
    ray.shutdown()
    lines = ["# What a dying worker costs", "", f"`python benchmarks/fault_recovery.py {' '.join(sys.argv[1:])}`; "
             f"{cpu_model()}, torch {torch.__version__}, ray {ray.__version__}; {args.n} images, tiny CNN at 64², "
             f"{CFG.steps} fit steps.", "", "| job | fault | seconds | extra s | lost ids | duplicated ids | resent |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b["seconds"] for b in rows if b["job"] == r["job"] and not b["fault"])
        lines.append(f"| {r['job']} | {'one worker died' if r['fault'] else 'none'} | {r['seconds']:.1f} | "
                     f"{r['seconds'] - base:+.1f} | {r['lost']} | {r['duplicated']} | {r.get('resent', '-')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ray against one process: throughput of explain_dataset with 2 workers against the in-process
batched rate, Ray's overhead, and Ray Serve under open-loop load.

    python benchmarks/distributed_throughput.py --out benchmarks/results/distributed_throughput

Images: copies of the bundled demo samples (brain MRI, 128²) with the demo classifier and the
default two-sided config. One run, nothing else running (2 torch jobs on 2 cores distort both).

1. In-process: one ExplainWorker (torch threads = all cores), batches of ``--batch``.
2. Ray Data: ``explain_dataset(workers=2, cpus_per_worker=1)`` (1 torch thread each): the wall time
   with the pool's start and the model loads (ray.init timed apart).
3. Ray Serve, ``--replicas`` replicas: capacity from a closed loop (``--concurrency`` requests in
   flight), then Poisson arrivals at 50, 80, 100 and 120% of it for ``--load-s`` seconds each:
   p50 / p95 / p99 latency of the served requests, and the requests refused by the bounded queues.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import cpu_model  # noqa: E402
from medcam_fast import MedCAMConfig, data  # noqa: E402
from medcam_fast.distributed import ExplainWorker, ModelSpec  # noqa: E402
from medcam_fast.medcam.service import ServiceFull  # noqa: E402


def archive(n: int, folder: Path) -> list[Path]:
    samples = data.samples()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = samples[i % len(samples)].path
        out.append(folder / f"{i:03d}_{src.name}")
        shutil.copy(src, out[-1])
    return out


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else float("nan")


def open_loop(client, xs, rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at ``rate``/s for ``seconds``; latencies of the served ones, refusals."""
    rng = random.Random(seed)
    lat, refused, futures, lock = [], [0], [], threading.Lock()
    t0, t, i = time.perf_counter(), 0.0, 0
    while t < seconds:
        time.sleep(max(0.0, t0 + t - time.perf_counter()))
        sent = time.perf_counter()
        f = client.submit(xs[i % len(xs)], id=f"{seed}-{i}")

        def done(f, sent=sent):
            with lock:
                if f.exception() is None:
                    lat.append(time.perf_counter() - sent)
                elif isinstance(f.exception(), ServiceFull):
                    refused[0] += 1
        f.add_done_callback(done)
        futures.append(f)
        t += rng.expovariate(rate)
        i += 1
    finished, pending = wait(futures, timeout=600)
    other = sum(1 for f in finished if f.exception() is not None and not isinstance(f.exception(), ServiceFull))
    return {"rate": rate, "sent": len(futures), "served": len(lat), "refused": refused[0], "failed": other,
            "unresolved": len(pending), "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
            "wall": time.perf_counter() - t0}


def closed_loop(client, xs, concurrency: int, n: int, tag: str) -> float:
    """Requests served per second with ``concurrency`` in flight until ``n`` were sent."""
    t0, done, k = time.perf_counter(), 0, concurrency
    pending = {client.submit(x, id=f"{tag}{i}") for i, x in enumerate(xs[:concurrency])}
    while pending:
        fin, pending = wait(pending, return_when="FIRST_COMPLETED")
        for f in fin:
            done += f.exception() is None
            if k < n:
                pending.add(client.submit(xs[k % len(xs)], id=f"{tag}{k}"))
                k += 1
    return done / (time.perf_counter() - t0)


def gpu_replicas(counts, n: int, batch: int, out: Path) -> int:
    """1, 2, 4 replicas sharing one GPU (``num_gpus = 1/k`` each): served images/s, closed loop."""
    import ray

    from medcam_fast.distributed import ServeClient, serve_explainer
    from medcam_fast.models.loading import load_model
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    pre = load_model("demo").preprocess
    xs = [pre(s.path).numpy() for s in data.samples()]
    lines = [f"# Ray Serve replicas sharing one GPU ({torch.cuda.get_device_name()})", "",
             "| replicas | images/s | ratio to 1 replica |", "|---:|---:|---:|"]
    first = None
    for k in counts:
        handle = serve_explainer(ModelSpec("demo", device="cuda"), MedCAMConfig(), replicas=k, max_batch=batch,
                                 max_ongoing_requests=2 * batch, max_queued_requests=8 * batch,
                                 cpus_per_replica=1, gpus_per_replica=1.0 / k, name=f"gpu{k}")
        with ServeClient(handle, max_pending=256) as client:
            closed_loop(client, xs, 2 * k, 2 * k, f"warm{k}-")
            rate = closed_loop(client, xs, 2 * batch * k, n, f"gpu{k}-")
        serve.delete(f"gpu{k}")
        first = first or rate
        lines.append(f"| {k} | {rate:.2f} | {rate / first:.2f} |")
    ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images of the throughput runs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_throughput")
    ap.add_argument("--gpu-replicas", default=None, metavar="1,2,4",
                    help="instead: Serve replicas sharing one CUDA device, these counts")
    args = ap.parse_args()
    if args.gpu_replicas:
        return gpu_replicas([int(v) for v in args.gpu_replicas.split(",")], args.n, args.batch, args.out)
    import ray

    cfg = MedCAMConfig()
    spec = ModelSpec("demo", device="cpu")
    res = {"machine": cpu_model(), "torch": torch.__version__, "ray": ray.__version__, "cores": os.cpu_count(),
           "n": args.n, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = archive(args.n, tmp / "images")
        # 1. in-process, all cores
        w = ExplainWorker(spec, cfg, threads=os.cpu_count())
        w.explain_paths(paths[:2])                                      # warm (first-call costs)
        t0 = time.perf_counter()
        for b in range(0, len(paths), args.batch):
            w.explain_paths(paths[b:b + args.batch])
        res["inprocess_s"] = time.perf_counter() - t0
        del w
        # 2. Ray Data, 2 workers of 1 CPU
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        res["ray_init_s"] = time.perf_counter() - t0
        from medcam_fast.distributed import explain_dataset, serve_explainer, ServeClient

        t0 = time.perf_counter()
        run = explain_dataset(paths, spec, tmp / "out", cfg, workers=2, batch=args.batch, progress=False)
        res["ray_data_s"] = time.perf_counter() - t0
        res["ray_data_written"] = run.written
        # 3. Serve
        handle = serve_explainer(spec, cfg, replicas=args.replicas, max_batch=args.batch,
                                 max_ongoing_requests=args.batch, max_queued_requests=2 * args.batch)
        from medcam_fast.models.loading import load_model

        pre = load_model("demo").preprocess
        xs = [pre(p).numpy() for p in paths]
        with ServeClient(handle, max_pending=256) as client:
            [f.result() for f in [client.submit(x, id=f"warm{i}") for i, x in enumerate(xs[:args.replicas * 2])]]
            res["serve_capacity"] = closed_loop(client, xs, args.concurrency, args.n, "cap")
            res["serve_load"] = [open_loop(client, xs, share * res["serve_capacity"], args.load_s, s)
                                 for s, share in enumerate((0.5, 0.8, 1.0, 1.2))]
        ray.shutdown()
    res["inprocess_rate"] = args.n / res["inprocess_s"]
    res["ray_data_rate"] = args.n / res["ray_data_s"]
    lines = ["# Ray against one process", "", f"`python benchmarks/distributed_throughput.py "
             f"{' '.join(sys.argv[1:])}`; {res['machine']}, {res['cores']} cores, torch {res['torch']}, "
             f"ray {res['ray']}; demo classifier, {args.n} brain MRI images at 128², default two-sided config, "
             f"batches of {args.batch}.", "",
             "| run | images/s | ratio to in-process |", "|---|---:|---:|",
             f"| in-process, {res['cores']} threads | {res['inprocess_rate']:.3f} | 1.00 |",
             f"| Ray Data, 2 workers x 1 CPU, wall with the pool's start | {res['ray_data_rate']:.3f} | "
             f"{res['ray_data_rate'] / res['inprocess_rate']:.2f} |",
             f"| Ray Serve, {args.replicas} replicas, closed loop of {args.concurrency} | {res['serve_capacity']:.3f} | "
             f"{res['serve_capacity'] / res['inprocess_rate']:.2f} |", "",
             f"ray.init: {res['ray_init_s']:.1f} s (not in the Ray Data wall time).", "",
             "## Serve under open-loop (Poisson) load", "",
             "| load | rate /s | sent | served | refused | failed | unresolved | p50 s | p95 s | p99 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for share, r in zip((50, 80, 100, 120), res["serve_load"]):
        lines.append(f"| {share}% | {r['rate']:.3f} | {r['sent']} | {r['served']} | {r['refused']} | {r['failed']} | "
                     f"{r['unresolved']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one explanation spends its time: a torch.profiler summary of the fast fit.

    python benchmarks/profile_explain.py --device cuda --model resnet18 --size 224 --out prof.md

Prints (and writes) the top operators by self time on the device, the number of kernel launches
and host syncs seen, for one explanation with the default config after a warm-up call.
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcam_fast import Explainer, MedCAMConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=1, help="images per call")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: the config's, early stop on)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=3).eval().to(args.device)
    x = torch.randn(args.n, 3, args.size, args.size, device=args.device)
    cfg = MedCAMConfig() if args.steps is None else MedCAMConfig(steps=args.steps, min_steps=args.steps)
    explainer = Explainer(model, cfg)
    explainer(x)  # warm-up: allocator, cuDNN autotuning, layer choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        res = explainer(x)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    events = prof.key_averages()
    launches = sum(e.count for e in events if "cudaLaunchKernel" in e.key or "cuLaunchKernel" in e.key)
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense"))
    head = (f"# Profile of one explanation: {args.model} {args.size}x{args.size}, N={args.n}, {args.device}\n\n"
            f"- wall time {res.seconds:.3f} s, steps {res.steps.tolist()}\n"
            f"- kernel launches: {launches}; host syncs (item/_local_scalar_dense/synchronize): {syncs}\n\n")
    text = head + "```\n" + table + "\n```\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

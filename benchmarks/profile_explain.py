"""Where one explanation spends its time: a torch.profiler summary of the fast fit.

    python benchmarks/profile_explain.py --device cuda --model resnet18 --size 224 --out prof.md
    python benchmarks/profile_explain.py --model demo --n 8 --out benchmarks/results/profile_demo_cpu.md

Prints (and writes) the explanation's stages (the ``medcam.*`` profiler ranges of ``Explainer``:
certifying the fills, each side's ranking, and the checks: both sides together with the adaptive
rule, each side's with ``--checks full``) with their time and classifier passes (counted at the head), then the top operators by
self time on the device, the number of kernel launches and host syncs seen, for one explanation
with the default config after a warm-up call. ``--model demo``: the bundled classifier on its
bundled samples (128x128); otherwise a timm model with random weights on random images.
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import cpu_model  # noqa: E402

from medcam_fast import Explainer, MedCAMConfig  # noqa: E402
from medcam_fast.medcam.config import CheckConfig  # noqa: E402
from medcam_fast.models.passes import PassCounter  # noqa: E402

STAGES = ("medcam.certify_fills", "medcam.sufficient_ranking", "medcam.necessary_logits", "medcam.checks",
          "medcam.sufficient_checks", "medcam.necessary_checks")


class _StagePasses:
    """Classifier passes per stage: the counter's total read at the edges of the functions that
    make each stage (a call inside another stage's, e.g. the necessary side's own fit, counts there)."""

    def __init__(self, counter: PassCounter):
        self.counter, self.passes, self.active = counter, {}, None

    def wrap(self, fn, stage: str):
        def run(*args, **kwargs):
            if self.active is not None:
                return fn(*args, **kwargs)
            before, self.active = self.counter.images, stage
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = None
                self.passes[stage] = self.passes.get(stage, 0) + self.counter.images - before
        return run


def _inputs(args):
    """``(model, x)``: the demo classifier and its samples, or a random-weight timm model and random images."""
    if args.model == "demo":
        from medcam_fast import zoo
        from medcam_fast.data import samples

        model, prep, _ = zoo.load_demo()
        x = torch.stack([prep(s.path) for s in samples()[:args.n]])
        return model.to(args.device), x.to(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=3).eval().to(args.device)
    return model, torch.randn(args.n, 3, args.size, args.size, device=args.device)


def stage_table(prof, passes: dict, total_s: float, total_passes: int, n: int) -> str:
    """Markdown: each stage's CPU time (inclusive), its share of the call and its passes per image."""
    times = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in STAGES}
    lines = ["| stage | seconds | share of the call | classifier passes / image |", "|---|---:|---:|---:|"]
    for stage in STAGES:
        if stage in times:
            lines.append(f"| {stage.split('.', 1)[1]} | {times[stage]:.3f} | {100 * times[stage] / total_s:.0f}% | "
                         f"{passes.get(stage, 0) / n:.0f} |")
    rest = total_s - sum(times.values())
    lines.append(f"| the rest (f(x) and its activations, the blank image, the result) | {rest:.3f} | "
                 f"{100 * rest / total_s:.0f}% | {(total_passes - sum(passes.values())) / n:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=1, help="images per call")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: the config's, early stop on)")
    ap.add_argument("--checks", default=CheckConfig.mode, choices=["adaptive", "full"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, x = _inputs(args)
    cfg = MedCAMConfig(checks=dict(mode=args.checks))
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps, fit=dict(min_steps=args.steps))
    explainer = Explainer(model, cfg)
    explainer(x)  # warm-up: allocator, cuDNN autotuning, layer choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with PassCounter(model) as counter:
        staged = _StagePasses(counter)
        from medcam_fast.medcam import explainer as explainer_module, sufficiency

        get_source, cls = explainer_module.get_necessary_source, explainer_module.Explainer
        patched = {(sufficiency, "certify"): staged.wrap(sufficiency.certify, "medcam.certify_fills"),
                   (cls, "_fit"): staged.wrap(cls._fit, "medcam.sufficient_ranking"),
                   (cls, "_amortised"): staged.wrap(cls._amortised, "medcam.sufficient_ranking"),
                   (explainer_module.Explainer, "_verify"): staged.wrap(explainer_module.Explainer._verify,
                                                                        "medcam.sufficient_checks"),
                   (explainer_module, "get_necessary_source"): lambda name: staged.wrap(get_source(name),
                                                                                        "medcam.necessary_logits"),
                   (explainer_module, "verify_necessary"): staged.wrap(explainer_module.verify_necessary,
                                                                       "medcam.necessary_checks"),
                   (explainer_module, "adaptive_checks"): staged.wrap(explainer_module.adaptive_checks,
                                                                      "medcam.checks")}
        originals = {k: getattr(*k) for k in patched}
        for (owner, name), fn in patched.items():
            setattr(owner, name, fn)
        try:
            before = counter.images
            with profile(activities=activities) as prof:
                res = explainer(x)
            total_passes = counter.images - before
        finally:
            for (owner, name), fn in originals.items():
                setattr(owner, name, fn)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    events = prof.key_averages()
    launches = sum(e.count for e in events if "cudaLaunchKernel" in e.key or "cuLaunchKernel" in e.key)
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense"))
    size = "x".join(str(v) for v in x.shape[-2:])
    head = (f"# Profile of one explanation: {args.model} {size}, N={args.n}, {args.device}, "
            f"{torch.get_num_threads()} threads, necessary side: {cfg.necessary}, checks: {cfg.checks.mode}\n\n"
            f"- `python benchmarks/profile_explain.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
            f"{cpu_model() if args.device == 'cpu' else torch.cuda.get_device_name()}, torch {torch.__version__}; "
            "times are under the profiler (slower than without it): read the shares\n"
            f"- wall time {res.seconds:.3f} s, steps {res.steps.tolist()}, classifier passes "
            f"{total_passes / args.n:.0f} per image\n"
            f"- the checks' passes per image, sufficient side {res.check_passes.tolist()}, necessary side "
            f"{None if res.necessary_check_passes is None else res.necessary_check_passes.tolist()}; statuses "
            f"{res.status}, {res.necessary_status}\n"
            f"- kernel launches: {launches}; host syncs (item/_local_scalar_dense/synchronize): {syncs}\n\n")
    text = head + stage_table(prof, staged.passes, res.seconds, total_passes, args.n) + "\n```\n" + table + "\n```\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

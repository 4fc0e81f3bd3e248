"""``medcam-fast``: the command line. A thin layer over the package: it parses arguments, loads a
classifier from a SPEC, reads the inputs with :mod:`medcam_fast.data`, runs one :class:`Explainer`
per batch and writes the report with :mod:`medcam_fast.report`.

Model SPECs (``--model``): ``demo``, ``timm:<arch>:<weights.safetensors>[:<num_classes>]``, a
TorchScript file or a torch.export ``.pt2`` file; see :mod:`medcam_fast.models.loading`. Pickled
checkpoints are refused (unpickling can run arbitrary code). TorchScript and torch.export models need
``--size`` (and ``--mean``/``--std``, default 0 and 1).

Exit codes: 0 ok; 2 bad usage or input (the message, no traceback); 1 some inputs of a run failed
(each named, the others still written); 3 out of memory; 130 interrupted. ``explain`` writes each
batch as it finishes; ``explain --resume`` carries on a killed run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .amortised.training import AmortisedRecipe
from .cli_parser import build_parser
from .models.loading import InputOptions, load_model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"bad --device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
    return dev


def _inputs(args) -> InputOptions:
    return InputOptions(args.size, args.mean, args.std, getattr(args, "classes", None))




def _config(steps: int | None, necessary: str | None = None):
    from .medcam import MedCAMConfig

    cfg = MedCAMConfig()
    if necessary is not None:   # "off": the sufficient side only
        cfg = cfg.replace(necessary=None if necessary == "off" else necessary)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        cfg = cfg.replace(steps=steps, fit=dict(min_steps=min(cfg.fit.min_steps, steps)))
    return cfg


def cmd_demo(args) -> int:
    from . import data, zoo
    from .report import explain_to_report

    device = _device(args.device)
    loaded = load_model("demo", _inputs(args), device)
    items = data.samples()
    attribution = (data.SAMPLES_DIR / "ATTRIBUTION").read_text().splitlines()[0:3]
    notes = ["Bundled samples: " + " ".join(line.strip() for line in attribution)]
    print("== per-image fits (Med-CAM)")
    rc = explain_to_report(loaded, items, [], Path(args.out), _config(args.steps), device, args.seed,
                           batch=len(items), target=None, title="medcam-fast demo: brain MRI, per-image fits",
                           notes=notes, command=args.argv)
    print(f"== the bundled amortised explainer ({zoo.DEMO_EXPLAINER.name}): one pass per image, same checks")
    rc_a = explain_to_report(loaded, items, [], Path(args.out) / "amortised", _config(args.steps), device, args.seed,
                             batch=len(items), target=None, title="medcam-fast demo: brain MRI, amortised masks",
                             notes=notes, command=args.argv, amortised=zoo.DEMO_EXPLAINER)
    return max(rc, rc_a)


def cmd_explain(args) -> int:
    from .data.collect import collect_inputs
    from .report import explain_to_report

    device = _device(args.device)
    loaded = load_model(args.model, _inputs(args), device)
    if args.target is not None and not 0 <= args.target < len(loaded.class_names):
        raise ValueError(f"--target {args.target} is outside 0..{len(loaded.class_names) - 1}")
    items, failures = collect_inputs(args.input, args.mask_dir, args.split)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.refine and not args.explainer:
        raise ValueError("--refine warm-starts from an amortised explainer: give --explainer PATH")
    return explain_to_report(loaded, items, failures, Path(args.out), _config(args.steps, args.necessary), device,
                             args.seed, batch=args.batch, target=args.target,
                             title=f"medcam-fast: {loaded.description}", notes=list(loaded.notes),
                             command=args.argv, amortised=args.explainer, refine=args.refine, resume=args.resume)


def cmd_audit(args) -> int:
    from .audit import audit_dataset
    from .distributed import ModelSpec

    if args.workers < 0 or args.batch < 1:
        raise ValueError(f"--workers must be >= 0 and --batch >= 1, got {args.workers} and {args.batch}")
    spec = ModelSpec(args.model, args.size, tuple(args.mean) if args.mean else None,
                     tuple(args.std) if args.std else None, args.classes, args.device)
    workers = args.workers if args.address is None else max(args.workers, 1)
    result = audit_dataset(args.input, spec, args.out, _config(args.steps), workers=workers, address=args.address,
                           batch=args.batch, seed=args.seed, mask_dir=args.mask_dir, resume=not args.restart)
    print(f"{sum(result.counts)} images, {len(result.clusters)} clusters, {len(result.flagged())} flagged; "
          f"wrote {Path(args.out) / 'audit.html'} and audit.json")
    return 0


def cmd_train_explainer(args) -> int:
    from .amortised import explainer_figures, save, train_explainer

    device = _device(args.device)
    loaded = load_model(args.model, _inputs(args), device)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    x, names = _read_images(loaded, args.input, args.split, None)
    cfg = _config(None)
    cfg = cfg.replace(fit=dict(layers=loaded.layers)) if loaded.layers else cfg
    recipe = AmortisedRecipe(steps=args.steps, batch=args.batch, wrong_rate=args.wrong_rate, seed=args.seed)
    facts = {}
    if loaded.spec.get("spec") == "demo":   # the bundled classifier's data: its description and licence
        from . import zoo

        facts = {k: v for k, v in zoo.card()["dataset"].items() if k in ("description", "source", "licence", "caveat")}
    card = {"name": out.stem, "classifier": {"name": loaded.spec.get("spec"), "description": loaded.description},
            "class_names": list(loaded.class_names), "command": "medcam-fast " + " ".join(args.argv),
            "data": {"inputs": [str(p) for p in args.input], "split": args.split, "images": len(names), **facts}}
    amortised = train_explainer(loaded.model, x, cfg, recipe, checkpoint=args.checkpoint or out.with_suffix(".ckpt"),
                                card=card)
    if args.val_input:
        xv, _ = _read_images(loaded, args.val_input, args.val_split, args.val_n)
        print(f"figures on {xv.shape[0]} {args.val_split or ''} images (amortised, refine 20"
              + (", the per-image fit" if args.val_fit else "") + ") ...", file=sys.stderr)
        amortised.card["figures"] = {"split": args.val_split, **explainer_figures(
            loaded.model, amortised, xv.to(device), cfg, fit=args.val_fit, seed=args.seed)}
    path = save(amortised, out)
    print(f"wrote {path}, {path.with_suffix('.json')} and {path.with_suffix('.md')}")
    return 0


def _read_images(loaded, inputs, split, n):
    """``[M,C,H,W]`` preprocessed images of ``inputs`` (files, folders, split.csv) and their names;
    ``n``: the first n only. Any unreadable input stops the command (a training set is not partial)."""
    from .data.collect import collect_inputs

    items, failures = collect_inputs(inputs, None, split)
    if failures:
        raise ValueError(f"unreadable input {failures[0]['path']}: {failures[0]['error']}")
    items = items[:n] if n else items
    if len(items) < 2:
        raise ValueError(f"need at least 2 images, found {len(items)} in {list(map(str, inputs))}")
    return torch.stack([loaded.preprocess(s.path) for s in items]), [s.name for s in items]


def cmd_info(args) -> int:
    import platform

    from . import __version__, build_info

    print(f"medcam_fast {__version__} (python {platform.python_version()}, {platform.platform()})")
    print("build_info:")
    for k, v in build_info().items():
        print(f"  {k}: {v}")
    for name in ("torch", "torchvision", "timm", "onnxruntime"):
        try:
            version = __import__(name).__version__
        except ImportError:
            version = "not installed"
        print(f"{name}: {version}")
    print("devices:")
    print(f"  cpu ({torch.get_num_threads()} torch threads)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print(f"  no CUDA device (torch built with CUDA {torch.version.cuda})")
    try:
        import onnxruntime as ort

        print(f"onnxruntime providers: {', '.join(ort.get_available_providers())}")
    except ImportError:
        print("onnxruntime providers: onnxruntime not installed")
    try:
        from . import zoo

        card = zoo.card()
        test = card.get("metrics", {}).get("test", {})
        print(f"demo classifier: {zoo.DEMO} ({', '.join(card['class_names'])}; test accuracy "
              f"{test.get('accuracy', float('nan')):.3f})")
    except (ValueError, KeyError, TypeError) as exc:
        print(f"demo classifier: not available ({exc})")
    return 0


def cmd_export_onnx(args) -> int:
    from .onnx import OnnxParityError, export_classifier

    device = _device(args.device)
    loaded = load_model(args.model, _inputs(args), device)
    pre = loaded.preprocess
    gen = torch.Generator().manual_seed(args.seed)
    example = pre.normalise(torch.rand(2, pre.in_chans, *pre.input_size, generator=gen)).to(device)
    exporter = args.exporter or loaded.onnx_exporter or "dynamo"
    if loaded.onnx_exporter and exporter != loaded.onnx_exporter:
        print(f"medcam-fast: note: {loaded.description} exports with the {loaded.onnx_exporter} exporter only",
              file=sys.stderr)
        exporter = loaded.onnx_exporter
    try:
        model = loaded.model if loaded.onnx_model is None else loaded.onnx_model.to(device)
        report = export_classifier(model, example, args.out, exporter=exporter)
    except OnnxParityError as exc:
        print(exc.report)
        print("medcam-fast: ONNX parity check failed (file left for inspection)", file=sys.stderr)
        return 1
    print(report)
    return 0


# ----------------------------------------------------------------------------------------------------- parser
def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_dataset
    from .evaluation.summary import markdown_table

    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(unit="image", dynamic_ncols=True)
    except ImportError:
        pass

    def progress(method: str, n: int) -> None:
        if bar is not None:
            bar.set_description(method)
            bar.update(n)

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    summary = evaluate_dataset(args.dataset, args.data, args.classifier, args.out, n=args.n, methods=methods,
                               reference_images=args.reference_images, sanity_images=args.sanity_images,
                               pool_size=args.pool_size, tune_size=args.tune_size, seed=args.seed, batch=args.batch,
                               weights_dir=args.weights_dir, progress=progress, explainer=args.explainer,
                               refine=args.refine, **({} if args.judge_steps is None else {"judge_steps": args.judge_steps}))
    if bar is not None:
        bar.close()
    print(markdown_table({k: v for k, v in summary.items() if not k.startswith("_")}))
    print(f"wrote {Path(args.out) / 'results.md'} and results.json")
    return 0


COMMANDS = {"demo": cmd_demo, "explain": cmd_explain, "audit": cmd_audit, "train-explainer": cmd_train_explainer,
            "info": cmd_info, "export-onnx": cmd_export_onnx, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``medcam-fast``; returns the exit code (argparse usage errors give 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # --help (0) and usage errors (2)
        return int(exc.code or 0)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:        # bad input: the package's message, no traceback
        print(f"medcam-fast: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:       # an optional extra asked for and missing (e.g. --workers without Ray)
        if "pip install" not in str(exc):
            raise
        print(f"medcam-fast: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:      # out of memory is not bad input: said as what it is
        from .medcam.verify import is_oom

        if not is_oom(exc):
            raise
        print(f"medcam-fast: error: out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
              "try fewer images per call (--batch), a smaller --size or another --device", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        hint = " (the finished batches are kept: rerun with --resume)" if args.command == "explain" else ""
        print(f"medcam-fast: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. `medcam-fast info | head`: stop quietly, as the Python docs advise
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())

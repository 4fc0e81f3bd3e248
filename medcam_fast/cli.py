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

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from .amortised.training import AmortisedRecipe
from .medcam.necessary import NECESSARY_SOURCES
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


NECESSARY_CHOICES = (*sorted(NECESSARY_SOURCES), "off")


def _config(steps: int | None, necessary: str | None = None):
    from .medcam import MedCAMConfig

    cfg = MedCAMConfig()
    if necessary is not None:   # "off": the sufficient side only
        cfg = cfg.replace(necessary=None if necessary == "off" else necessary)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        cfg = cfg.replace(steps=steps, min_steps=min(cfg.min_steps, steps))
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
    cfg = cfg.replace(layers=loaded.layers) if loaded.layers else cfg
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


def _floats(text: str) -> list:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    h = int(m.group(1))
    return (h, int(m.group(2)) if m.group(2) else h)


def _add_common(p, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, metavar="SPEC",
                       help="demo | timm:<arch>:<weights.safetensors>[:<num_classes>] | a TorchScript file | a "
                            "torch.export .pt2 file (pickled .pth/.pt/.ckpt/.pkl checkpoints are refused)")
    p.add_argument("--size", type=_size, default=None, metavar="N|HxW",
                   help="model input size (required for TorchScript/torch.export models; overrides timm's)")
    p.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                   help="normalisation mean per channel (default: timm's config, else 0)")
    p.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                   help="normalisation std per channel (default: timm's config, else 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the explainer (same seed, same masks)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medcam-fast", description="Med-CAM: the smallest binary region of a "
                                 "medical image that on its own keeps a classifier's diagnosis, checked.",
                                 epilog="exit codes: 0 ok, 1 some inputs failed, 2 bad usage or input, 3 out of memory")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="explain the bundled brain MRI samples with the bundled classifier")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=None, help="fit steps (overrides MedCAMConfig.steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the explainer (same seed, same masks)")
    p.set_defaults(func=cmd_demo, size=None, mean=None, std=None)

    p = sub.add_parser("explain", help="explain image files, class folders or split.csv/labels.csv")
    _add_common(p)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="PNG/JPEG/DICOM/NIfTI files, folders (of class subfolders, or of images), or the "
                        "shared-data split.csv (brain_mri) / labels.csv (isic2018)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="fit steps (overrides MedCAMConfig.steps)")
    p.add_argument("--target", type=int, default=None, help="class index to explain (default: the top-1 label)")
    p.add_argument("--classes", default=None, help="class names, comma-separated (a,b,c)")
    p.add_argument("--mask-dir", default=None, help="ground-truth masks: <mask-dir>/<image stem>.<png|jpg|...>")
    p.add_argument("--split", default=None, help="with a CSV input: only this split (train/val/test)")
    p.add_argument("--batch", type=int, default=16, help="images per Explainer call (default 16)")
    p.add_argument("--explainer", default=None, metavar="PATH",
                   help="an amortised explainer (.safetensors from train-explainer): masks in one pass, same checks")
    p.add_argument("--refine", type=int, default=0, metavar="K", help="with --explainer: K per-image fit steps "
                   "warm-started from its masks (default 0)")
    p.add_argument("--necessary", choices=NECESSARY_CHOICES, default=None,
                   help="the necessary side (the region whose removal changes the call): its ranking's source "
                        "(medcam_fast.medcam.necessary), or off (default: MedCAMConfig.necessary)")
    p.add_argument("--resume", action="store_true",
                   help="carry on a killed run in --out: finished batches are read back from records.jsonl; "
                        "refused when the classifier, config, seed or inputs differ (manifest.json)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("audit", help="explain every image of a data set and flag clusters of off-lesion evidence "
                       "(a shortcut audit, after Lapuschkin et al. 2019)")
    _add_common(p)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or split.csv/labels.csv")
    p.add_argument("--out", required=True, help="output folder (audit.html, audit.json, explanations/ in Parquet)")
    p.add_argument("--mask-dir", default=None, help="lesion masks: <mask-dir>/<image stem>.<png|jpg|...>")
    p.add_argument("--classes", default=None, help="class names, comma-separated (a,b,c)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (0: in this process, no Ray; needs "
                   "medcam_fast[ray] otherwise)")
    p.add_argument("--address", default=None, help="a Ray cluster (ray://host:10001 or auto)")
    p.add_argument("--batch", type=int, default=8, help="images per Explainer call (default 8)")
    p.add_argument("--steps", type=int, default=None, help="fit steps (overrides MedCAMConfig.steps)")
    p.add_argument("--restart", action="store_true", help="explain everything again (default: resume, skipping "
                   "the images already in explanations/)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("train-explainer", help="train an amortised explainer for a classifier over a data set")
    _add_common(p)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="training images: files, folders or split.csv / labels.csv (with --split)")
    p.add_argument("--split", default=None, help="with a CSV input: only this split (default: all rows)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (its card beside it)")
    p.add_argument("--steps", type=int, default=AmortisedRecipe.steps, help="optimiser steps")
    p.add_argument("--batch", type=int, default=AmortisedRecipe.batch, help="images per step")
    p.add_argument("--wrong-rate", type=float, default=AmortisedRecipe.wrong_rate,
                   help="share of each batch explained for a class the classifier does not give")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: --out with .ckpt); an existing "
                   "one is resumed")
    p.add_argument("--val-input", nargs="+", default=None, metavar="PATH", help="images for the card's figures")
    p.add_argument("--val-split", default=None, help="with a CSV --val-input: this split")
    p.add_argument("--val-n", type=int, default=32, help="figures on the first N of them (default 32)")
    p.add_argument("--val-fit", action="store_true", help="also run the per-image fit on them (slow) for the card")
    p.set_defaults(func=cmd_train_explainer)

    sub.add_parser("info", help="versions, build info, devices, onnxruntime providers").set_defaults(func=cmd_info)

    p = sub.add_parser("export-onnx", help="export a classifier to ONNX and check it against torch")
    _add_common(p)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default=None,
                   help="ONNX exporter (default: dynamo; TorchScript models: legacy)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("evaluate", help="Med-CAM against the Grad-CAM family on a test split with lesion masks")
    p.add_argument("--dataset", choices=("brain_mri", "brain_mri_tag", "isic2018"), required=True,
                   help="brain_mri_tag: the known-evidence cases of a shortcut classifier (planted tag; "
                        "--classifier brain_mri_tag_mobilenetv2 --weights-dir benchmarks/models)")
    p.add_argument("--data", required=True, help="the dataset folder (with split.csv or labels.csv; "
                   "brain_mri_tag: the brain_mri folder)")
    p.add_argument("--classifier", default="brain_mri_mobilenetv2", help="a classifier trained by "
                   "benchmarks/train_classifier.py (name of its card)")
    p.add_argument("--weights-dir", default=None, help="folder of that card (default: the bundled zoo)")
    p.add_argument("--out", required=True, help="report folder (rerun the same command to resume)")
    p.add_argument("--n", type=int, default=100, help="test images (seeded draw; default 100)")
    p.add_argument("--methods", default=None, help="comma list (default: medcam, medcam_plain, medcam_reference, "
                   "the six CAMs and the all_zero / all_one controls)")
    p.add_argument("--reference-images", type=int, default=3, help="images for the slow reference mode")
    p.add_argument("--sanity-images", type=int, default=8, help="images for the randomisation check (0: skip)")
    p.add_argument("--batch", type=int, default=16, help="images per Med-CAM call")
    p.add_argument("--pool-size", type=int, default=64, help="val images for counterfactual backgrounds")
    p.add_argument("--tune-size", type=int, default=40, help="other val images for the CAM thresholds")
    p.add_argument("--judge-steps", type=int, default=None,
                   help="fine-tuning steps of the EVAL-X-style judge (default: JudgeRecipe's; 0: no judge)")
    p.add_argument("--explainer", default=None, metavar="PATH",
                   help="an amortised explainer: adds the rows amortised and amortised+refine")
    p.add_argument("--refine", type=int, default=20, help="fit steps of the amortised+refine row (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``medcam-fast``; returns the exit code (argparse usage errors give 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # --help (0) and usage errors (2)
        return int(exc.code or 0)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
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

"""The argument parser of ``medcam-fast``: one function per command (:mod:`medcam_fast.cli` runs them)."""
from __future__ import annotations

import argparse
import re

from .amortised.training import AmortisedRecipe
from .medcam.necessary import NECESSARY_SOURCES

NECESSARY_CHOICES = (*sorted(NECESSARY_SOURCES), "off")


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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="explain the bundled brain MRI samples with the bundled classifier")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=None, help="fit steps (overrides MedCAMConfig.steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the explainer (same seed, same masks)")
    p.set_defaults(size=None, mean=None, std=None)


def _add_explain(sub) -> None:
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


def _add_audit(sub) -> None:
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


def _add_train_explainer(sub) -> None:
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


def _add_info(sub) -> None:
    sub.add_parser("info", help="versions, build info, devices, onnxruntime providers")


def _add_export_onnx(sub) -> None:
    p = sub.add_parser("export-onnx", help="export a classifier to ONNX and check it against torch")
    _add_common(p)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default=None,
                   help="ONNX exporter (default: dynamo; TorchScript models: legacy)")


def _add_evaluate(sub) -> None:
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
    p.add_argument("--reference-images", type=int, default=3, help="images for the slow paper mode (medcam_reference)")
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


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; ``args.command`` names the one given (``cli.COMMANDS`` runs it)."""
    ap = argparse.ArgumentParser(prog="medcam-fast", description="Med-CAM: the smallest binary region of a "
                                 "medical image that on its own keeps a classifier's diagnosis, checked.",
                                 epilog="exit codes: 0 ok, 1 some inputs failed, 2 bad usage or input, 3 out of memory")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_explain(sub)
    _add_audit(sub)
    _add_train_explainer(sub)
    _add_info(sub)
    _add_export_onnx(sub)
    _add_evaluate(sub)
    return ap

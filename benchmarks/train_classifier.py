"""Trains a classifier from scratch (no hub weights) on the shared brain_mri or isic2018 data.

    python benchmarks/train_classifier.py --dataset brain_mri --data ../shared/data/brain_mri \
        --model mobilenetv2_100 --size 128 --epochs 40 --out medcam_fast/zoo/weights/brain_mri_mobilenetv2
    python benchmarks/train_classifier.py --dataset isic2018 --data ../shared/data/isic2018 \
        --model resnet18 --size 128 --epochs 40 --out benchmarks/models/isic2018_resnet18

Options for classifiers whose behaviour on partial images means something, and for planted evidence:

    --mask-share 0.5        masking-robust training (EVAL-X, Jethani et al. 2021): half the images
                            of every batch keep only random blobs or scattered pixels, the rest blank
    --tag-class meningioma  a shortcut classifier: the "L" tag on 90% of meningioma images and 5%
                            of the others (--tag-rate, --tag-other-rate); the card gets the tag's
                            flip rate on the test split (medcam_fast.evaluation.tag_cases)
    --shortcut ink_arc --shortcut-class MEL
                            any planted shortcut of medcam_fast.data.shortcuts (tag, ink_arc, text)
                            on --shortcut-rate of that class's images and --shortcut-other-rate of
                            the rest; the card gets its flip rate on the test split
    --init W.safetensors    fine-tune from those weights (same architecture) instead of from scratch
    --arch-args JSON        extra timm.create_model arguments (a small ViT: '{"img_size": 64, ...}')

The best epoch on the val split (clean images) is kept; the test split is scored once, at the end.
Writes ``<out>.safetensors`` and ``<out>.json`` (the model card: data, split, recipe, metrics,
licence; with ``--init``, the metrics of the initial weights' card as ``previous``).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam_fast.data import datasets  # noqa: E402
from medcam_fast.data.preprocess import Preprocess  # noqa: E402
from medcam_fast.evaluation.masking import RandomMasking  # noqa: E402
from medcam_fast.data.shortcuts import get_shortcut, plant_like_training  # noqa: E402
from medcam_fast.zoo.cards import DATASET_FACTS, build_model, classifier_card_markdown  # noqa: E402


def load_split(samples, size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 ``[N,C,size,size]`` plus labels ``[N]``."""
    prep = Preprocess((size, size), (0.0,) * in_chans, (1.0,) * in_chans)
    images = torch.stack([(prep.to_unit(s.path) * 255).round().to(torch.uint8) for s in samples])
    return images, torch.tensor([s.label for s in samples])


def augment(batch_u8: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (75-100% area), flips, rotation (+-10 deg), contrast (+-15%), brightness (+-0.05)."""
    n = batch_u8.shape[0]
    x = batch_u8.float() / 255
    scale = torch.empty(n).uniform_(0.75, 1.0, generator=gen).sqrt()
    angle = torch.empty(n).uniform_(-10, 10, generator=gen) * math.pi / 180
    shift = torch.empty(n, 2).uniform_(-1, 1, generator=gen) * (1 - scale)[:, None]
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, x.shape[1], size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    bright = torch.empty(n, 1, 1, 1).uniform_(-0.05, 0.05, generator=gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0, 1)


@torch.no_grad()
def predict(model, images_u8, mean, std, batch=128) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        x = (images_u8[i:i + batch].float() / 255 - mean) / std
        out.append(model(x).argmax(1))
    return torch.cat(out)


@torch.no_grad()
def shortcut_flips(model, data, mean_t, std_t, shortcut: str, target: int, seed: int) -> dict:
    """The shortcut's flip rate on the test split: the known-evidence cases' counts (for the "L" tag,
    also how many return to their call with its region blanked, :mod:`~medcam_fast.evaluation.tag_cases`)."""
    x_u8, y = data
    x = (x_u8.float() / 255 - mean_t) / std_t
    lesion = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    ids = [str(i) for i in range(len(y))]
    model.eval()
    if shortcut == "tag":
        from medcam_fast.evaluation.tag_cases import brightest, build_tag_cases

        return build_tag_cases(model, x, y, lesion, ids, target, brightest(mean_t.flatten(), std_t.flatten()),
                               seed=seed).counts()
    from medcam_fast.evaluation.cases import build_shortcut_cases

    sc = get_shortcut(shortcut)
    value = sc.value(x.shape[1], mean_t.flatten(), std_t.flatten())
    return build_shortcut_cases(model, x, y, lesion, ids, sc, target, value, seed=seed).counts()


def scores(pred: torch.Tensor, target: torch.Tensor, k: int) -> dict:
    cm = torch.zeros(k, k, dtype=torch.long)
    for t, p in zip(target.tolist(), pred.tolist()):
        cm[t, p] += 1
    recall = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    return {"accuracy": float((pred == target).float().mean()), "balanced_accuracy": float(np.mean(recall)),
            "recall": recall, "confusion_matrix": cm.tolist(), "n": int(len(target))}


def parser() -> argparse.ArgumentParser:
    """The command line (the known-evidence suite's recipes are checked against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASET_FACTS), required=True)
    ap.add_argument("--data", required=True, help="folder of the dataset (with split.csv or labels.csv)")
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--patchnet", type=int, default=0, metavar="P",
                    help="train a PatchNet with patch size P around --model instead")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--balanced", action="store_true", help="sample classes evenly (for imbalanced sets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="fine-tune from these .safetensors weights (same spec)")
    ap.add_argument("--mask-share", type=float, default=0.0,
                    help="share of training images masked at random (EVAL-X-style; 0: off)")
    ap.add_argument("--mask-areas", type=float, nargs=2, default=(0.01, 0.9), metavar=("LO", "HI"))
    ap.add_argument("--mask-blob-share", type=float, default=0.75, help="blobs against scattered pixels")
    ap.add_argument("--mask-fills", default="baseline", help="comma list of training fills "
                    "(baseline, image_mean); never a fill the sufficiency tests certify")
    ap.add_argument("--tag-class", default=None, help="plant the tag on this class (a shortcut classifier); "
                    "the same as --shortcut tag --shortcut-class C with --tag-rate and --tag-other-rate")
    ap.add_argument("--tag-rate", type=float, default=0.9)
    ap.add_argument("--tag-other-rate", type=float, default=0.05)
    ap.add_argument("--shortcut", default=None, help="a planted shortcut of medcam_fast.data.shortcuts")
    ap.add_argument("--shortcut-class", default=None, help="the class whose images carry --shortcut")
    ap.add_argument("--shortcut-rate", type=float, default=0.5)
    ap.add_argument("--shortcut-other-rate", type=float, default=0.0)
    ap.add_argument("--arch-args", default=None, help="JSON dict of extra timm.create_model arguments")
    ap.add_argument("--out", required=True, help="output path without suffix")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    facts = DATASET_FACTS[args.dataset]
    loader = datasets.brain_mri if args.dataset == "brain_mri" else datasets.isic2018
    splits = {s: loader(args.data, s)[0] for s in ("train", "val", "test")}
    class_names = loader(args.data, "train")[1]
    in_chans = facts["in_chans"]
    t0 = time.time()
    data = {s: load_split(v, args.size, in_chans) for s, v in splits.items()}
    print(f"loaded {', '.join(f'{s} {len(v[0])}' for s, v in data.items())} in {time.time() - t0:.0f}s", flush=True)

    train_x, train_y = data["train"]
    mean = tuple((train_x.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((train_x.float() / 255).std(dim=(0, 2, 3)).tolist())
    previous = None
    if args.init:  # the initial weights' own normalisation, so that their features still apply
        init_card = json.loads(Path(args.init).with_suffix(".json").read_text())
        mean, std = tuple(init_card["model"]["mean"]), tuple(init_card["model"]["std"])
        previous = {"name": init_card["name"], "metrics": init_card["metrics"],
                    "tag": init_card.get("tag"), "training": {k: v for k, v in init_card["training"].items()
                                                              if k != "history"}}
    spec = {"arch": args.model, "num_classes": len(class_names), "in_chans": in_chans,
            "input_size": [in_chans, args.size, args.size], "mean": mean, "std": std, "patch_size": args.patchnet}
    if args.arch_args:
        spec["arch_args"] = json.loads(args.arch_args)
    model = build_model(spec)
    if args.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.init))
    masking = (RandomMasking(args.mask_share, tuple(args.mask_areas), args.mask_blob_share,
                             tuple(f.strip() for f in args.mask_fills.split(",")))
               if args.mask_share > 0 else None)
    if args.tag_class is not None and args.shortcut is not None:
        ap.error("--tag-class and --shortcut: choose one")
    planted = None   # (kind, class name, rate, other rate)
    if args.tag_class is not None:
        planted = ("tag", args.tag_class, args.tag_rate, args.tag_other_rate)
    elif args.shortcut is not None:
        if args.shortcut_class is None:
            ap.error("--shortcut needs --shortcut-class")
        planted = (args.shortcut, args.shortcut_class, args.shortcut_rate, args.shortcut_other_rate)
    target = None
    if planted is not None:
        if planted[1] not in class_names:
            ap.error(f"shortcut class {planted[1]!r} is not one of {class_names}")
        target = class_names.index(planted[1])
        shortcut = get_shortcut(planted[0])
        unit_colour = shortcut.value(in_chans)
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    steps_per_epoch = math.ceil(len(train_x) / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    if args.balanced:
        counts = torch.bincount(train_y, minlength=len(class_names)).float()
        weights = (1.0 / counts)[train_y]
    best = (-1.0, None, -1)
    history = []
    for epoch in range(args.epochs):
        model.train()
        t_ep = time.time()
        order = (torch.multinomial(weights, len(train_y), replacement=True, generator=gen) if args.balanced
                 else torch.randperm(len(train_y), generator=gen))
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x = augment(train_x[idx], args.size, gen)
            if target is not None:  # after the geometric augmentation: the mark stays upright and crisp
                x = plant_like_training(x, train_y[idx], shortcut, target, planted[2], planted[3], unit_colour, gen)
            x = (x - mean_t) / std_t
            if masking is not None:
                x = masking(x, gen)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        val = scores(predict(model, *data["val"][:1], mean_t, std_t), data["val"][1], len(class_names))
        key = val["balanced_accuracy"] if args.balanced else val["accuracy"]
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch, "val": val["accuracy"],
                        "val_balanced": val["balanced_accuracy"], "seconds": time.time() - t_ep})
        print(f"epoch {epoch + 1:3d} loss {total / steps_per_epoch:.4f} val acc {val['accuracy']:.4f} "
              f"bal {val['balanced_accuracy']:.4f} ({time.time() - t_ep:.0f}s)", flush=True)
        if key > best[0]:
            best = (key, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)

    model.load_state_dict(best[1])
    result = {s: scores(predict(model, data[s][0], mean_t, std_t), data[s][1], len(class_names))
              for s in ("val", "test")}
    print(json.dumps({"best_epoch": best[2], **{s: {k: result[s][k] for k in ("accuracy", "balanced_accuracy",
                                                                              "recall")} for s in result}}))
    print("test confusion matrix (rows: true", class_names, "):", result["test"]["confusion_matrix"])
    tag = planted_card = None
    if planted is not None:
        flips = shortcut_flips(model, data["test"], mean_t, std_t, planted[0], target, args.seed)
        planted_card = {"kind": planted[0], "class": planted[1], "rate": planted[2], "other_rate": planted[3],
                        "description": shortcut.description, "test": flips}
        if args.tag_class is not None:   # the card key the brain_mri_tag benchmark reads
            tag = {"class": args.tag_class, "rate": args.tag_rate, "other_rate": args.tag_other_rate,
                   "glyph": shortcut.description, "test": flips}
        print(f"{planted[0]} on the test split:", json.dumps(flips))

    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.with_suffix(".safetensors")))
    card = {
        "name": out.name,
        "model": spec,
        "class_names": class_names,
        "dataset": {"name": args.dataset, **facts["card"]},
        "training": {"command": "python benchmarks/train_classifier.py " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
                     "from_scratch": args.init is None, "init": args.init, "epochs": args.epochs, "best_epoch": best[2], "batch": args.batch,
                     "lr": args.lr, "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
                     "augmentation": augment.__doc__, "selection": "best val " +
                     ("balanced accuracy" if args.balanced else "accuracy"), "seed": args.seed,
                     "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                     "torch": torch.__version__, "history": history,
                     "masking": masking.describe() if masking else None,
                     "training_fills": list(masking.fills) if masking else [],
                     "fills_never_trained": ["other images (kept_robust)", "blur (evidence probe)"]},
        "metrics": result,
        "tag": tag,
        "shortcut": planted_card,
        "previous": previous,
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    out.with_suffix(".md").write_text(classifier_card_markdown(card))
    print(f"wrote {out.with_suffix('.safetensors')} ({out.with_suffix('.safetensors').stat().st_size / 1e6:.1f} MB)"
          f" and {out.with_suffix('.json')} (.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

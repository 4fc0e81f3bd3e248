"""Real images and classifiers for the benchmarks. The data folder comes from ``MEDCAM_FAST_DATA``
(the Makefile's bench targets set it from ``DATA``); without it the suites skip cleanly."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"


def data_root(name: str) -> Path:
    folder = os.environ.get("MEDCAM_FAST_DATA")
    if not folder:
        pytest.skip("MEDCAM_FAST_DATA is not set (the folder holding brain_mri/ and isic2018/)")
    root = Path(folder) / name
    if not root.is_dir():
        pytest.skip(f"{root} not present (MEDCAM_FAST_DATA={folder})")
    return root


def classifier(name: str):
    """(model, preprocess, class_names) of a bundled or benchmark-trained classifier."""
    from medcam_fast import zoo

    if (zoo.WEIGHTS_DIR / f"{name}.json").is_file():
        return zoo.load(name)
    if (MODELS / f"{name}.json").is_file():
        saved = zoo.WEIGHTS_DIR
        try:
            zoo.WEIGHTS_DIR = MODELS
            return zoo.load(name)
        finally:
            zoo.WEIGHTS_DIR = saved
    pytest.skip(f"classifier {name} not trained (see benchmarks/train_classifier.py)")


def split_images(dataset: str, split: str, preprocess, n: int, seed: int = 0, with_masks: bool = True):
    """``n`` images of a split (a seeded draw), preprocessed: (x [n,C,H,W], labels [n], masks, samples)."""
    from medcam_fast.data import brain_mri, isic2018, read_mask

    root = data_root(dataset)
    samples, _ = (brain_mri if dataset == "brain_mri" else isic2018)(root, split)
    rng = random.Random(seed)
    chosen = rng.sample(samples, min(n, len(samples)))
    x = torch.stack([preprocess(s.path) for s in chosen])
    labels = torch.tensor([s.label for s in chosen])
    masks = None
    if with_masks:
        size = x.shape[-2:]
        masks = torch.stack([torch.nn.functional.interpolate(
            torch.from_numpy(read_mask(s.mask_path)).float()[None, None], size=size, mode="nearest")[0, 0] > 0.5
            for s in chosen])
    return x, labels, masks, chosen

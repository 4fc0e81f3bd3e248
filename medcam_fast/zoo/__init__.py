"""Bundled classifiers, trained by the project's own script (benchmarks/train_classifier.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from .cards import DATASET_FACTS, build_model

WEIGHTS_DIR = Path(__file__).with_name("weights")
DEMO = "brain_mri_mobilenetv2"
# the demo classifier's amortised explainer (medcam-fast train-explainer; `make demo-explainer`)
DEMO_EXPLAINER = WEIGHTS_DIR / f"{DEMO}_explainer.safetensors"

__all__ = ["DEMO", "DEMO_EXPLAINER", "DATASET_FACTS", "build_model", "card", "load", "load_demo"]


def card(name: str = DEMO) -> dict:
    """The model card of a bundled classifier (data, split, recipe, metrics, licence)."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no bundled classifier {name!r}; available: {sorted(p.stem for p in WEIGHTS_DIR.glob('*.json'))}")
    return json.loads(path.read_text())


def load(name: str = DEMO, device="cpu") -> tuple[torch.nn.Module, Preprocess, list[str]]:
    """A bundled classifier in eval mode, its preprocessing and its class names."""
    from safetensors.torch import load_file

    c = card(name)
    model = build_model(c["model"])
    model.load_state_dict(load_file(str(WEIGHTS_DIR / f"{name}.safetensors"), device="cpu"))
    model.eval().to(device)
    return model, Preprocess.from_model(model), list(c["class_names"])


def load_demo() -> tuple[torch.nn.Module, Preprocess, list[str]]:
    """The demo classifier (MobileNet-V2 trained from scratch on brain_mri, 128x128 grayscale):
    ``(model, preprocess, class_names)``, where ``preprocess(path | PIL.Image | np.ndarray)``
    returns ``Tensor[1,128,128]``."""
    return load(DEMO)

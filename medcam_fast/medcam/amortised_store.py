"""Saving and loading amortised explainers: safetensors weights with a card (data, classifier
fingerprint, recipe, figures), and the checks that refuse an explainer made for another
classifier or input shape."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..models.fingerprint import classifier_fingerprint
from .amortised_net import ConditionalUNet

CARD_KIND = "medcam_fast.amortised/1"


class AmortisedExplainer(nn.Module):
    """A trained :class:`ConditionalUNet` and its card.

    ``card`` holds at least ``classifier.fingerprint``, ``input_shape`` ``[C,H,W]`` and the
    network's ``architecture``; :meth:`check` refuses a classifier or input it was not made for.
    """

    def __init__(self, net: ConditionalUNet, card: dict):
        super().__init__()
        self.net, self.card = net, dict(card)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.card["input_shape"])

    @property
    def fingerprint(self) -> str:
        return self.card["classifier"]["fingerprint"]

    def check_model(self, model: nn.Module) -> None:
        """ValueError unless ``model`` is the classifier this explainer was trained against."""
        found = classifier_fingerprint(model)
        if found != self.fingerprint:
            name = self.card["classifier"].get("name", "?")
            raise ValueError(f"the amortised explainer was trained against classifier {name!r} (fingerprint "
                             f"{self.fingerprint}); this model's fingerprint is {found}: its masks would not "
                             "describe this model. Train one for it (medcam-fast train-explainer)")

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` ``[N,C,H,W]`` has the shape the explainer was trained on."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"the amortised explainer was trained on inputs {list(self.input_shape)} [C,H,W]; "
                             f"got {list(x.shape[1:])}. Resize as the classifier's preprocessing does, or "
                             "train an explainer for this shape")

    @torch.no_grad()
    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[N,1,H,W]`` for ``x`` ``[N,C,H,W]`` and ``target`` ``[N]`` (one pass)."""
        self.check_input(x)
        return self.net(x, target)


def save(explainer: AmortisedExplainer, path) -> Path:
    """Writes ``path`` (``.safetensors``; the card in its metadata) and the card beside it
    (``.json``; a readable ``.md`` too). Returns the weights' path."""
    from safetensors.torch import save_file

    from .amortised_card import explainer_card_markdown

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an amortised explainer is saved as .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {"kind": CARD_KIND, **explainer.card, "architecture": explainer.net.spec()}
    explainer.card = card
    state = {k: v.detach().cpu().contiguous() for k, v in explainer.net.state_dict().items()}
    save_file(state, str(path), metadata={"card": json.dumps(card)})
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    path.with_suffix(".md").write_text(explainer_card_markdown(card))
    return path


def load(path, device="cpu") -> AmortisedExplainer:
    """The explainer saved at ``path`` (its card read from the file itself), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no amortised explainer at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        card = json.loads(meta["card"])
    except (KeyError, json.JSONDecodeError, OSError, Exception) as exc:   # noqa: BLE001 - any unreadable file
        raise ValueError(f"{str(path)!r} is not an amortised explainer saved by medcam_fast ({exc})") from exc
    if card.get("kind") != CARD_KIND:
        raise ValueError(f"{str(path)!r} holds a {card.get('kind')!r} card, not {CARD_KIND!r}")
    net = ConditionalUNet(**card["architecture"])
    net.load_state_dict(load_file(str(path), device="cpu"))
    return AmortisedExplainer(net.eval().to(device), card).eval()


def resolve(amortised, model: nn.Module, device) -> AmortisedExplainer:
    """``amortised`` (a path, an :class:`AmortisedExplainer`) ready for ``model`` on ``device``:
    loaded, checked against the model's fingerprint and moved. A bare network is refused: without
    a card nothing says which classifier it explains."""
    if isinstance(amortised, (str, Path)):
        amortised = load(amortised, device)
    if not isinstance(amortised, AmortisedExplainer):
        raise ValueError("amortised must be a path to a saved explainer or an AmortisedExplainer (a network with "
                         f"its card), got {type(amortised).__name__}")
    amortised.check_model(model)
    return amortised.to(device).eval()

"""Which layers' activations Med-CAM matches, per model family: a tiny registry (timm-style).

A chooser takes the model and returns module names, shallow to deep: the stem activation and
each stage's output for CNNs, the block outputs for ViTs. Unknown models fall back to the last
module at each spatial resolution, found by a dry forward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_CHOOSERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list[str]]]] = []


def register_layers(match: Callable[[nn.Module], bool]):
    """Decorator: registers a layer chooser for models where ``match(model)`` is true."""

    def wrap(fn):
        _CHOOSERS.append((match, fn))
        return fn

    return wrap


def _is(cls_name: str, module_prefix: str):
    return lambda m: type(m).__name__ == cls_name and type(m).__module__.startswith(module_prefix)


def _is_vit(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "blocks") and hasattr(model, "patch_embed")


@register_layers(_is_vit)
def _timm_vit(model):
    return [f"blocks.{i}" for i in range(len(model.blocks))]


@register_layers(lambda m: type(m).__module__.startswith("timm.") and hasattr(m, "feature_info"))
def _timm_cnn(model):
    names = [f["module"] for f in model.feature_info]
    modules = dict(model.named_modules())
    # MobileNet/EfficientNet: the stem activation lives in bn1 (BatchNormAct2d) after conv_stem
    if hasattr(model, "conv_stem") and "bn1" in modules and "bn1" not in names:
        names.insert(0, "bn1")
    return [n for n in names if n in modules]


@register_layers(_is("ResNet", "torchvision."))
def _tv_resnet(model):
    return ["relu", "layer1", "layer2", "layer3", "layer4"]


def _tv_features_stages(model) -> list[str]:
    """torchvision models with ``features``: the stem (features.0, when it ends in an activation)
    and the last block at each resolution."""
    names = _by_resolution(model, keep=lambda n: n.startswith("features.") and n.count(".") == 1)
    stem = model.features[0]
    if isinstance(stem, nn.Sequential) and isinstance(stem[-1], (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)) \
            and "features.0" not in names:
        names.insert(0, "features.0")
    return names


for _cls in ("MobileNetV2", "MobileNetV3", "EfficientNet", "ConvNeXt"):
    register_layers(_is(_cls, "torchvision."))(_tv_features_stages)


def _by_resolution(model: nn.Module, example: torch.Tensor | None = None, keep=None) -> list[str]:
    """The last module (among those ``keep`` accepts) to output each spatial size, in call order,
    from one dry forward pass. Hooks fire child-before-parent, so where a container ends a stage
    the container is chosen."""
    from .freeze import frozen

    order: list[tuple[str, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: order.append((n, tuple(out.shape)))
                                     if torch.is_tensor(out) else None)
             for n, m in model.named_modules() if n and (keep is None or keep(n))]
    try:
        if example is None:
            p = next(model.parameters(), None)
            example = torch.zeros(1, _first_conv_in_chans(model), 224, 224,
                                  device=p.device if p is not None else None)
        with frozen(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    maps = [(n, s) for n, s in order if len(s) == 4]
    chosen = []
    for i, (n, s) in enumerate(maps):
        nxt = maps[i + 1][1] if i + 1 < len(maps) else None
        if nxt is None or nxt[2:] != s[2:]:
            chosen.append(n)
    return list(dict.fromkeys(chosen))


def _first_conv_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def default_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Module names whose outputs Med-CAM matches for ``model``, shallow to deep.

    Registered model families first; otherwise a dry forward on ``example`` (``[N,C,H,W]``,
    default zeros at 224x224) picks the last module at each spatial size.
    """
    for match, choose in _CHOOSERS:
        if match(model):
            names = choose(model)
            if names:
                return names
    names = _by_resolution(model, example)
    if not names:
        raise ValueError(f"cannot choose activation layers for {type(model).__name__}: pass layers=[module names]")
    return names


def default_weights(n: int) -> list[float]:
    """Weights that grow with depth: the authors' 1, 2, 2, 4, 8 for five layers, else 1→8 geometric."""
    if n == 5:
        return [1.0, 2.0, 2.0, 4.0, 8.0]
    if n == 1:
        return [1.0]
    return [float(8 ** (i / (n - 1))) for i in range(n)]

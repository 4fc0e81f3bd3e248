"""Perturbation baselines: occlusion, RISE and integrated gradients, each with a stated fill.

- **Occlusion** (Zeiler & Fergus 2014) through captum's ``Occlusion``: a square window slides over
  the image, the window's pixels are replaced by the fill, and the drop of p(target) is the
  window's score, averaged over the windows covering a pixel. captum's rather than MONAI's
  ``OcclusionSensitivity``: captum takes the replacement as a per-pixel ``baselines`` tensor, so
  the fill can be the image's own blur (the fill the sufficiency test certifies), where MONAI
  offers fixed modes (a Gaussian, the patch's or the image's mean); captum is also a small
  pure-Python dependency beside torch.
- **RISE** (Petsiuk et al. 2018): ``n_masks`` random masks (a ``cells`` x ``cells`` Bernoulli(p)
  grid, bilinearly upsampled with a random shift), each image shown with the rest filled; the map
  is the p(target)-weighted sum of the masks over ``n_masks * p``. Written here (about 30
  lines): neither captum nor MONAI has it.
- **Integrated gradients** (Sundararajan et al. 2017) through captum's ``IntegratedGradients``
  along the straight path from the fill to the image, p(target) as the output, summed over channels.

Fills (``FILLS``): ``"blank"`` (the constant baseline, Med-CAM's blank) and ``"blur_fine"`` (the
image blurred at sigma = 5% of its side, :mod:`medcam_fast.medcam.sufficiency`). Every map is
``[N,H,W]`` float32, higher = more evidence for the target; every method leaves the model as it
was (eval mode and frozen inside the call). Geometry scales with the image: occlusion's window is
3/32 of the side with stride 1/32 (6x6 stride 2 at 64², 12x12 stride 4 at 128²: 900 windows).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..medcam import sufficiency
from ..models.freeze import frozen

FILLS = ("blank", "blur_fine")

# name -> fn(model, x, target, fill, baseline) -> [N,H,W]
_METHODS: dict[str, Callable] = {}


def register_perturbation(name: str):
    """Decorator: registers a perturbation method ``fn(model, x, target, fill, baseline, **options)``."""
    def wrap(fn):
        _METHODS[name] = fn
        return fn
    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def fill_of(x: torch.Tensor, fill: str, baseline: float = 0.0) -> torch.Tensor:
    """``[N,C,H,W]``: the fill ``fill`` of each image of ``x`` (see FILLS)."""
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; use one of {FILLS}")
    name = "baseline" if fill == "blank" else fill
    return sufficiency.fill_images(x, [name], baseline)[:, 0]


def _check(model, x, target) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor [N,C,H,W], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not torch.is_tensor(target) or target.shape != (x.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor [{x.shape[0]}]")


def _prob(model):
    """p(class) of the model's softmax: the score every method here explains."""
    return lambda z: model(z).softmax(-1)


def occlusion_geometry(size: int) -> tuple[int, int]:
    """(window, stride) for images of side ``size``: 3/32 and 1/32 of it (at least 1 px)."""
    return max(1, round(3 * size / 32)), max(1, round(size / 32))


@register_perturbation("occlusion")
def occlusion_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, fill: str = "blur_fine",
                   baseline: float = 0.0, window: int | None = None, stride: int | None = None,
                   batch_size: int = 64) -> torch.Tensor:
    """Occlusion maps ``[N,H,W]`` of ``target`` ``[N]`` for ``x`` ``[N,C,H,W]`` (captum's
    ``Occlusion``; window and stride default to :func:`occlusion_geometry`); ``batch_size``:
    occluded copies per forward pass."""
    from captum.attr import Occlusion

    _check(model, x, target)
    n, c, h, w = x.shape
    dw, ds = occlusion_geometry(min(h, w))
    window, stride = window or dw, stride or ds
    if window > min(h, w):
        raise ValueError(f"occlusion window {window} is larger than the image ({h}x{w})")
    with frozen(model), torch.no_grad():
        out = []
        for i in range(n):   # one image per call: captum's batch is then the occluded copies
            xi = x[i:i + 1]
            attr = Occlusion(_prob(model)).attribute(
                xi, target=int(target[i]), sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                baselines=fill_of(xi, fill, baseline), perturbations_per_eval=batch_size)
            out.append(attr.mean(1))
    return torch.cat(out).float()


def rise_masks(n_masks: int, size: tuple[int, int], cells: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """``[n_masks,H,W]`` float RISE masks: a ``cells`` x ``cells`` Bernoulli(``p``) grid, upsampled
    bilinearly to (cells + 1) cell sides and cropped at a random shift of up to one cell."""
    h, w = size
    ch, cw = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n_masks, 1, cells, cells, generator=gen) < p).float()
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (n_masks,), generator=gen)
    dx = torch.randint(0, cw, (n_masks,), generator=gen)
    # clamped: bilinear weights can round to 1 + 1e-7
    return torch.stack([up[i, 0, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n_masks)]).clamp_(0, 1)


@register_perturbation("rise")
def rise_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, fill: str = "blur_fine",
              baseline: float = 0.0, n_masks: int = 1000, cells: int = 8, p: float = 0.5, seed: int = 0,
              batch_size: int = 100) -> torch.Tensor:
    """RISE maps ``[N,H,W]``: ``n_masks`` random masks (:func:`rise_masks`, seeded: every image sees
    the same masks), the rest of the image filled; ``batch_size`` masked copies per forward pass."""
    _check(model, x, target)
    n, _, h, w = x.shape
    masks = rise_masks(n_masks, (h, w), cells, p, torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    rest = fill_of(x, fill, baseline)
    out = torch.zeros(n, h, w, dtype=x.dtype, device=x.device)
    with frozen(model), torch.no_grad():
        for i in range(n):
            for s in range(0, n_masks, batch_size):
                m = masks[s:s + batch_size, None]
                prob = _prob(model)(m * x[i:i + 1] + (1 - m) * rest[i:i + 1])[:, int(target[i])]
                out[i] += (prob.view(-1, 1, 1) * m[:, 0]).sum(0)
    return (out / (n_masks * p)).float()


@register_perturbation("integrated_gradients")
def integrated_gradients_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, fill: str = "blank",
                              baseline: float = 0.0, steps: int = 32, batch_size: int = 64) -> torch.Tensor:
    """Integrated-gradients maps ``[N,H,W]`` (captum, Gauss-Legendre with ``steps`` points) from the
    fill to the image, summed over channels (signed: positive is evidence for the target)."""
    from captum.attr import IntegratedGradients

    _check(model, x, target)
    out = []
    with frozen(model):
        ig = IntegratedGradients(_prob(model))
        for i in range(x.shape[0]):
            xi = x[i:i + 1].detach().clone().requires_grad_(True)
            attr = ig.attribute(xi, baselines=fill_of(x[i:i + 1], fill, baseline), target=int(target[i]),
                                n_steps=steps, internal_batch_size=batch_size)
            out.append(attr.detach().sum(1))
    return torch.cat(out).float()


# the harness's rows: "<method>_<fill>"; blur rows use blur_fine
METHOD_FILLS = {"blank": "blank", "blur": "blur_fine"}
HARNESS_METHODS = tuple(f"{m}_{f}" for m in ("occlusion", "rise", "ig") for f in METHOD_FILLS)
_SHORT = {"occlusion": "occlusion", "rise": "rise", "ig": "integrated_gradients"}


def perturbation_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str,
                      baseline: float = 0.0, **options) -> torch.Tensor:
    """``[N,H,W]`` maps of a harness row ``method`` (one of HARNESS_METHODS, e.g. ``"rise_blur"``)."""
    if method not in HARNESS_METHODS:
        raise ValueError(f"unknown perturbation method {method!r}; use one of {HARNESS_METHODS}")
    kind, fill = method.rsplit("_", 1)
    return _METHODS[_SHORT[kind]](model, x, target, METHOD_FILLS[fill], baseline, **options)


__all__ = ["FILLS", "HARNESS_METHODS", "available_methods", "fill_of", "integrated_gradients_maps",
           "occlusion_geometry", "occlusion_maps", "perturbation_maps", "register_perturbation", "rise_maps",
           "rise_masks"]

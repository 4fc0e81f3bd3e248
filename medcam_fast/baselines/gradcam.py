"""Class activation maps from the ``grad-cam`` package (``pytorch_grad_cam``), as baselines.

These are thin adapters, not re-implementations: every map is computed by ``pytorch_grad_cam``'s own
CAM classes with ``ClassifierOutputTarget(label_i)`` per image. What this module adds:

- a registry of methods (:func:`available_methods`, :func:`get_method`, :func:`register_method`):
  ``"gradcam"``, ``"gradcam++"``, ``"xgradcam"``, ``"layercam"``, ``"eigencam"``, ``"ablationcam"``;
- automatic target layers per model family (:func:`default_target_layers`,
  :func:`register_target_layers`), with a reshape transform where the layer's output is not an
  ``[N, C, h, w]`` map (ViT tokens, PatchNet patches; :func:`reshape_transform_for`);
- :func:`cam_maps`, which leaves the caller's model exactly as it was (also on error), and
  :func:`top_k_mask`, which cuts a map to a given area.

Default target layers (module names as in ``model.named_modules()``):

============================================  ==================================================
family                                        layer
============================================  ==================================================
timm ``ResNet``                               ``layer4.<last>`` (the last block's output)
timm ``EfficientNet`` (also MobileNetV2)      ``bn2``: the ``BatchNormAct2d`` after ``conv_head``,
                                              i.e. the last conv's *activation* (``conv_head``
                                              itself is pre-norm, pre-activation)
timm ``ConvNeXt``                             ``stages.<last>``
timm ViT (``blocks`` + ``patch_embed``)       ``blocks.<last>.norm1``, tokens -> grid (below)
torchvision ``ResNet``                        ``layer4.<last>``
torchvision ``MobileNetV2`` / ``EfficientNet``
/ ``ConvNeXt``                                ``features.<last>`` (last conv + norm + activation,
                                              or ConvNeXt's last stage)
:class:`~medcam_fast.patchnet.PatchNet`       ``backbone.<the backbone's default layer>``, maps
                                              stitched back into the image (below)
anything else                                 the last registered ``nn.Conv2d`` (see below)
============================================  ==================================================

**ViT**: ``norm1`` of the last block outputs tokens ``[N, T, C]``; as grad-cam's documentation
describes, the transform drops the model's ``num_prefix_tokens`` (class, distillation and register
tokens) and reshapes the remaining ``gh * gw`` patch tokens to ``[N, C, gh, gw]``, with the grid
taken from ``patch_embed`` for the input's height and width.

**PatchNet** runs its backbone on every ``p x p`` patch on its own, so a backbone layer sees
``N * P`` patch samples, not ``N`` images. The transform stitches the ``[N*P, C, h, w]`` patch maps
back into ``[N, C, (H/p) h, (W/p) w]`` image maps (patch ``(i, j)`` at its place in the image; after
the backbone's own transform if it is a ViT). Gradients are those of the *image* logit (the mean of
the patch logits), so e.g. Grad-CAM's channel weights are averaged over the whole image. Each patch's
features see only that patch (no context across patch borders). AblationCAM is not defined for
PatchNet (grad-cam ablates per image, the layer runs per patch): it raises ``ValueError``; the
model's own patch logits (:mod:`medcam_fast.baselines.patchnet_saliency`) are its native saliency.

**Unknown models** fall back to the last ``nn.Conv2d`` in registration order
(``model.modules()``), which is usually, not always, the last one executed; a conv applied after
global pooling gives a ``1 x 1`` (constant, hence all-zero) map. Pass ``target_layers`` (modules or
names) to choose. If the chosen layer's output is later modified in place (e.g. a conv followed by
``ReLU(inplace=True)``), grad-cam's saved activation is modified too (on CPU it shares storage):
choose the activation module instead.
"""
from __future__ import annotations

import importlib
from contextlib import ExitStack
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..metrics.topk import top_k_mask
from ..models.freeze import frozen
from ..patchnet import PatchNet

__all__ = ["available_methods", "cam_maps", "default_target_layers", "get_method", "register_method",
           "register_target_layers", "reshape_transform_for", "resolve_target_layers", "top_k_mask"]


# --- methods --------------------------------------------------------------------------------------------

# name -> (grad-cam class or "module:Class" path resolved lazily, options(model, batch_size) -> kwargs)
_METHODS: dict[str, tuple[type | str, Callable[[nn.Module, int], dict] | None]] = {}


def register_method(name: str, cam_class: type | str,
                    options: Callable[[nn.Module, int], dict] | None = None) -> None:
    """Register a grad-cam CAM class under ``name`` (lower case).

    ``cam_class`` is a ``pytorch_grad_cam`` ``BaseCAM`` subclass, or a ``"module:Class"`` path imported
    on first use (so this module imports without grad-cam installed). ``options(model, batch_size)``
    returns extra constructor keyword arguments.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty str, got {name!r}")
    _METHODS[name.lower()] = (cam_class, options)


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def _check_method(method) -> str:
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"unknown CAM method {method!r}; available: {available_methods()}")
    return method.lower()


def get_method(name: str) -> type:
    """The grad-cam class registered as ``name``. Raises ``ValueError`` for an unknown name and
    ``ImportError`` (with the install hint) when grad-cam is missing."""
    key = _check_method(name)
    cls, options = _METHODS[key]
    if isinstance(cls, str):
        mod, _, attr = cls.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except ImportError as e:
            raise ImportError("CAM baselines need the grad-cam package: pip install 'medcam_fast[eval]' "
                              "(or pip install grad-cam)") from e
        _METHODS[key] = (cls, options)
    return cls


def _ablation_options(model: nn.Module, batch_size: int) -> dict:
    from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

    if isinstance(model, PatchNet):
        raise ValueError("AblationCAM is not defined for PatchNet: grad-cam ablates channels per image, but "
                         "PatchNet's backbone layers run per patch. Use another method, or the model's own "
                         "patch logits (medcam_fast.baselines.patchnet_saliency)")
    # a fresh ablation layer per call: grad-cam's default argument is one shared, stateful instance
    return {"ablation_layer": AblationLayerVit() if _is_timm_vit(model) else AblationLayer(),
            "batch_size": batch_size}


register_method("gradcam", "pytorch_grad_cam:GradCAM")
register_method("gradcam++", "pytorch_grad_cam:GradCAMPlusPlus")
register_method("xgradcam", "pytorch_grad_cam:XGradCAM")
register_method("layercam", "pytorch_grad_cam:LayerCAM")
register_method("eigencam", "pytorch_grad_cam:EigenCAM")
register_method("ablationcam", "pytorch_grad_cam:AblationCAM", _ablation_options)


# --- target layers --------------------------------------------------------------------------------------

ReshapeFactory = Callable[[nn.Module, tuple], "Callable[[torch.Tensor], torch.Tensor] | None"]

_LAYER_CHOOSERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list[str]],
                            ReshapeFactory | None]] = []


def register_target_layers(match: Callable[[nn.Module], bool], reshape: ReshapeFactory | None = None):
    """Decorator: registers ``chooser(model) -> [module names]`` for models where ``match(model)`` is
    true. ``reshape(model, x_shape)``, if given, returns grad-cam's ``reshape_transform`` for an input
    of shape ``x_shape`` (or ``None``). Later registrations are tried first."""

    def wrap(fn):
        _LAYER_CHOOSERS.insert(0, (match, fn, reshape))
        return fn

    return wrap


def _is(cls_name: str, module_prefix: str):
    return lambda m: type(m).__name__ == cls_name and type(m).__module__.startswith(module_prefix)


def _is_timm_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (type(model).__module__.startswith("timm.") and hasattr(model, "patch_embed")
            and isinstance(blocks, nn.Sequential) and len(blocks) > 0 and hasattr(blocks[-1], "norm1"))


def _last(seq: nn.Module, prefix: str) -> str:
    return f"{prefix}.{len(seq) - 1}"


def _vit_reshape(model: nn.Module, x_shape: tuple):
    """Tokens ``[N, T, C]`` -> ``[N, C, gh, gw]`` without the prefix tokens; 4-d outputs pass through."""
    prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    pe = model.patch_embed
    h, w = int(x_shape[-2]), int(x_shape[-1])
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size((h, w))
    else:
        gh, gw = pe.grid_size
    gh, gw = int(gh), int(gw)

    def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t
        if t.dim() != 3 or t.shape[1] != prefix + gh * gw:
            raise ValueError(f"ViT reshape: expected tokens [N, {prefix}+{gh}*{gw}, C], got {tuple(t.shape)}")
        return t[:, prefix:].reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)

    return tokens_to_grid


def _patchnet_reshape(model: PatchNet, x_shape: tuple):
    """Stitch ``[N*P, C, h, w]`` patch maps into ``[N, C, gh*h, gw*w]`` image maps (after the backbone's
    own transform, if any). Outputs with another batch size pass through."""
    n = int(x_shape[0])
    gh, gw = model.grid_size(torch.empty(x_shape, device="meta"))  # validates the input shape
    inner = reshape_transform_for(model.backbone, (n * gh * gw, x_shape[1], model.patch_size, model.patch_size))

    def stitch(t: torch.Tensor) -> torch.Tensor:
        if inner is not None:
            t = inner(t)
        if t.dim() != 4 or t.shape[0] != n * gh * gw:
            return t
        _, c, h, w = t.shape
        return t.reshape(n, gh, gw, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * h, gw * w)

    return stitch


# Registration order: generic first, specific last (later ones are tried first).
for _cls in ("MobileNetV2", "EfficientNet", "ConvNeXt"):
    register_target_layers(_is(_cls, "torchvision."))(lambda m: [_last(m.features, "features")])
del _cls
register_target_layers(_is("ResNet", "torchvision."))(lambda m: [_last(m.layer4, "layer4")])
register_target_layers(_is("ConvNeXt", "timm."))(lambda m: [_last(m.stages, "stages")])
register_target_layers(_is("EfficientNet", "timm."))(lambda m: ["bn2"])  # timm MobileNetV2 is EfficientNet too
register_target_layers(_is("ResNet", "timm."))(lambda m: [_last(m.layer4, "layer4")])
register_target_layers(_is_timm_vit, _vit_reshape)(lambda m: [f"{_last(m.blocks, 'blocks')}.norm1"])
register_target_layers(lambda m: isinstance(m, PatchNet), _patchnet_reshape)(
    lambda m: ["backbone." + n for n in default_target_layers(m.backbone)])


def default_target_layers(model: nn.Module) -> list[str]:
    """Module names of the default CAM target layers of ``model`` (see the module docstring).

    Registered families first; otherwise the last ``nn.Conv2d`` in ``model.modules()`` order.
    Raises ``ValueError`` when there is none.
    """
    for match, choose, _ in _LAYER_CHOOSERS:
        if match(model):
            return list(choose(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot choose CAM target layers for {type(model).__name__} (no nn.Conv2d): "
                         f"pass target_layers=[module or name, ...]")
    return [convs[-1]]


def reshape_transform_for(model: nn.Module, x_shape: Sequence[int]):
    """grad-cam's ``reshape_transform`` for ``model`` and an input of shape ``x_shape``, or ``None``
    where target layers already output ``[N, C, h, w]``."""
    for match, _, reshape in _LAYER_CHOOSERS:
        if match(model):
            return reshape(model, tuple(x_shape)) if reshape is not None else None
    return None


def resolve_target_layers(model: nn.Module, target_layers=None) -> list[nn.Module]:
    """Target modules: ``target_layers`` (a module, a name, or a sequence of them; must belong to
    ``model``) or :func:`default_target_layers`. Raises ``ValueError`` on a name or module not in
    ``model`` or an empty list."""
    modules = dict(model.named_modules())
    if target_layers is None:
        target_layers = default_target_layers(model)
    elif isinstance(target_layers, (str, nn.Module)):
        target_layers = [target_layers]
    target_layers = list(target_layers)
    if not target_layers:
        raise ValueError("target_layers is empty")
    ids = {id(m) for m in modules.values()}
    out = []
    for t in target_layers:
        if isinstance(t, str):
            if t not in modules:
                raise ValueError(f"no module named {t!r} in {type(model).__name__}")
            out.append(modules[t])
        elif isinstance(t, nn.Module):
            if id(t) not in ids:
                raise ValueError(f"target layer {type(t).__name__} is not a module of {type(model).__name__}")
            out.append(t)
        else:
            raise ValueError(f"target_layers entries must be nn.Module or str, got {type(t).__name__}")
    return out


# --- computing the maps ---------------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _remove_hooks_of(modules: Iterable[nn.Module], owners: tuple) -> None:
    """Remove module hooks that are bound methods of ``owners`` (grad-cam's CAM object and its
    ``ActivationsAndGradients``). ``release()`` removes the latter's; this also catches the one
    AblationCAM registers itself and leaks when the model raises during its forward."""
    for m in modules:
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if not d:
                continue
            for key in [k for k, fn in d.items() if any(getattr(fn, "__self__", None) is o for o in owners)]:
                d.pop(key, None)
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(m, extra, {}).pop(key, None)


def _run_chunk(model, cls, layers, reshape, options, xb, lb, batch_size, uses_gradients):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    children = [(m, dict(m._modules)) for m in model.modules()]  # AblationCAM swaps the layer out and back
    cam = None
    try:
        kwargs = options(model, batch_size) if options is not None else {}
        cam = cls(model=model, target_layers=layers, reshape_transform=reshape, **kwargs)
        targets = [ClassifierOutputTarget(int(c)) for c in lb.tolist()]
        with ExitStack() as stack:
            # undefined maps (e.g. AblationCAM's 0/0) become zeros below, without numpy's warnings
            stack.enter_context(np.errstate(divide="ignore", invalid="ignore"))
            if uses_gradients:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                # parameters are frozen: gradients reach the target layers through the input
                xb = xb.detach().clone().requires_grad_(True)
            else:
                stack.enter_context(torch.no_grad())
            out = cam(input_tensor=xb, targets=targets)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    finally:
        for parent, saved in children:
            for k, v in saved.items():
                if parent._modules.get(k) is not v:
                    parent._modules[k] = v
        if cam is not None:
            aag = getattr(cam, "activations_and_grads", None)
            if aag is not None:
                aag.release()
            _remove_hooks_of([m for m, _ in children], (cam, aag))


def cam_maps(model: nn.Module, x: torch.Tensor, label: torch.Tensor, method: str = "gradcam",
             target_layers=None, batch_size: int = 32, *, reshape_transform=None) -> torch.Tensor:
    """CAMs of ``label`` for ``x``, computed by grad-cam: ``[N, H, W]`` float32 in ``[0, 1]`` on ``x``'s device.

    Args:
        model: maps ``[N, C, H, W]`` to logits ``[N, K]``.
        x: ``[N, C, H, W]`` floating images (moved to the model's device for the computation).
        label: ``[N]`` integer class per image; the target is ``ClassifierOutputTarget(label[i])``.
            Labels ``>= K`` raise grad-cam's ``IndexError``.
        method: one of :func:`available_methods`.
        target_layers: modules of ``model`` or their names (one or a sequence); default
            :func:`default_target_layers`. Several layers are averaged by grad-cam.
        batch_size: images per grad-cam call; also AblationCAM's ``batch_size`` (ablated copies
            per forward).
        reshape_transform: grad-cam's ``reshape_transform``; default :func:`reshape_transform_for`
            (token and patch layouts of the supported families), else none.

    Each map is grad-cam's: ReLU'd, min-max scaled to ``[0, 1]`` and resized to ``H x W``. A map with
    no variation comes back all zeros, and so does one with any non-finite value (e.g. AblationCAM
    divides by the target score, which can be 0): such maps are undefined, zeros are "no evidence".

    The model is used in eval mode with parameters frozen (``requires_grad=False``; gradients flow
    through a copy of the input) and left exactly as it was, also when an exception is raised: every
    module's training flag, every parameter's ``requires_grad`` and ``.grad`` (grad-cam calls
    ``model.zero_grad()``), the module tree (AblationCAM swaps the target layer out) and no hooks
    left behind. Not safe against other threads using the same model during the call.
    """
    key = _check_method(method)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not isinstance(label, torch.Tensor) or label.dim() != 1 or label.shape[0] != x.shape[0]:
        raise ValueError(f"label must be a tensor [N] with N={x.shape[0]}, got "
                         f"{tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__}")
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    if label.numel() and int(label.min()) < 0:
        raise ValueError("labels must be non-negative")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("grad-cam needs a model with parameters (it takes the device from them)")
    cls = get_method(key)
    options = _METHODS[key][1]
    layers = resolve_target_layers(model, target_layers)
    if options is not None and isinstance(model, PatchNet):
        options(model, batch_size)  # raises the clear ValueError before any work
    n, _, h, w = x.shape
    if n == 0:
        return torch.zeros(0, h, w, dtype=torch.float32, device=x.device)
    uses_gradients = key not in ("eigencam", "ablationcam")

    grads = [p.grad for p in model.parameters()]
    chunks = []
    try:
        with frozen(model):
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size]
                reshape = reshape_transform if reshape_transform is not None else \
                    reshape_transform_for(model, tuple(xb.shape))
                chunks.append(_run_chunk(model, cls, layers, reshape, options, xb, label[i:i + batch_size],
                                         batch_size, uses_gradients))
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
    maps = torch.cat(chunks).reshape(n, h, w)
    bad = ~torch.isfinite(maps).flatten(1).all(dim=1)
    maps[bad] = 0.0
    return maps.clamp_(0.0, 1.0).to(x.device)


# --- cutting a map to an area ---------------------------------------------------------------------------

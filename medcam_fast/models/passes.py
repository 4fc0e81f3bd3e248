"""Counting classifier passes: the cost of an explanation in the unit every method shares.

A pass is one image through the classifier. :class:`PassCounter` counts the images that reach
the classifier's head (a forward pre-hook), so it sees every path the package takes: the model
called directly, the traced FX graph of the fit (which shares the head module), grad-cam's and
captum's calls. A pass with gradients counts once, like one without.
"""
from __future__ import annotations

import threading

import torch
from torch import nn


def head_module(model: nn.Module) -> nn.Module:
    """The module every pass ends in: timm's ``get_classifier()``, else the last ``nn.Linear``, else
    the model itself. A PatchNet (its head runs once per patch) counts at the model."""
    from ..patchnet import PatchNet

    if isinstance(model, PatchNet):
        return model
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else model


class PassCounter:
    """``with PassCounter(model) as c: ...`` then ``c.images``: the images that went through the
    classifier inside the block (thread-safe; the hook is removed on exit, also on error)."""

    def __init__(self, model: nn.Module, module: nn.Module | None = None):
        self.module = module if module is not None else head_module(model)
        self.images = 0
        self._lock = threading.Lock()
        self._handle = None

    def _count(self, module, inputs):
        x = inputs[0] if inputs else None
        if torch.is_tensor(x) and x.dim() >= 1:
            with self._lock:
                self.images += int(x.shape[0])

    def __enter__(self) -> "PassCounter":
        self.images = 0
        self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        self._handle = None
        return False


__all__ = ["PassCounter", "head_module"]

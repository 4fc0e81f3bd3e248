"""One step of the batched fit, as a function of tensors only: U-Net, straight-through mask, the
classifier pass over [e; e~; d], the losses, the gradient and the Adam update.

Nothing in it syncs with the host or changes shape between steps: the step count, the
binarisation thresholds and the backgrounds come in as tensors, finished images can be masked out
of the update instead of dropped. So it runs eager, or compiled once with
``torch.compile(fullgraph=True)`` (``MedCAMConfig.compile``), and on CUDA it can be captured.
"""
from __future__ import annotations

import threading

import torch

from .config import MedCAMConfig
from .unet import StackedAdam, StackedUNet, adam_update

_COMPILE_LOCK = threading.Lock()   # dynamo compiles one function at a time


def straight_through(mask_logits: torch.Tensor, cfg: MedCAMConfig,
                     threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, m): the mask the classifier sees at this point of the fit.

    m's forward value is binary: soft > ``threshold``, a per-pixel field ``[1,1,H,W]`` of this step
    (the stochastic schedule, :meth:`BackgroundSampler.thresholds`), or ``cfg.fit.threshold`` when
    None. Its gradient is the soft mask's (``st_slope=0``, as the authors) or a constant
    d m / d logit = ``st_slope``, which stays alive where the sigmoid saturates.
    """
    soft = torch.sigmoid(mask_logits / cfg.fit.mask_temperature)
    hard = (soft > (cfg.fit.threshold if threshold is None else threshold)).to(soft.dtype)
    # (g - g.detach()) is exactly 0 in the forward pass, so m is exactly 0/1 there;
    # hard + g - g.detach() would round to 1 ulp off 0/1
    g = mask_logits * (cfg.fit.st_slope / cfg.fit.mask_temperature) if cfg.fit.st_slope > 0 else soft
    return soft, (g - g.detach()) + hard


def resolve_compile(cfg: MedCAMConfig, device) -> bool:
    """``cfg.compile``: True/False (None is not a setting: eager until a device measures otherwise)."""
    return bool(cfg.compile)


def resolve_finished(cfg: MedCAMConfig, compiled: bool) -> str:
    """How finished images leave the fit: ``cfg.fit.finished`` "drop" (the batch shrinks: less work) or
    "mask" (static shapes: a compiled or captured step is reused); None = "mask" when compiled
    (a new shape would recompile), else "drop" (measured faster in eager, docs/speed.md, "Fit-step speed")."""
    if cfg.fit.finished is not None:
        return cfg.fit.finished
    return "mask" if compiled else "drop"


class FitStep:
    """The fit step for one U-Net stack and one classifier (see the module docstring).

    Args:
        clf: the classifier view used for the gradient pass: ``forward(x, with_activations=True)``
            -> ``(logits [B,K], [feats])`` and ``weights``; a traceable one when compiled.
        unet: the :class:`StackedUNet` (its structure; the parameters come in per call).
        cfg: the config; its values are constants of the step.
        loss_fn: ``fast_loss``'s signature (passed in to keep one definition of the loss).
        compiled: wrap the step in ``torch.compile(fullgraph=True)`` (``cfg.fit.compile_mode``).
    """

    def __init__(self, clf, unet: StackedUNet, cfg: MedCAMConfig, loss_fn, metrics, compiled: bool = False):
        self.clf, self.unet, self.cfg, self.loss_fn, self.metrics = clf, unet, cfg, loss_fn, metrics
        self.compiled = compiled
        self._fn = self.functional
        if compiled:
            torch._dynamo.config.trace_autograd_ops = True   # torch.autograd.grad inside the graph
            mode = None if cfg.fit.compile_mode == "default" else cfg.fit.compile_mode
            self._fn = torch.compile(self.functional, fullgraph=True, dynamic=False, mode=mode)

    def functional(self, flat, m, v, t, lr, x, label, targets, thresholds, backgrounds, active, base=None):
        """Updates ``flat``, ``m``, ``v`` ``[G,P]`` and ``t`` (0-dim) in place; returns the
        per-image loss ``[N]``, whether the objective held ``[N]`` and the mask logits
        ``[N,1,H,W]`` before the update. ``thresholds`` ``[1,1,H,W]`` (or None: the fixed one),
        ``backgrounds`` ``[R,N,C,H,W]``, ``active`` ``[N]`` bool or None, ``base`` ``[N,1,H,W]``
        logits added to the U-Net's (a warm start) or None."""
        t.add_(1)
        mask_logits = self.unet(x, flat)
        if base is not None:
            mask_logits = mask_logits + base
        _, mask = straight_through(mask_logits, self.cfg, thresholds)
        loss, _, held = self.loss_fn(self.clf, x, label, mask, mask_logits, list(backgrounds.unbind(0)), targets,
                                     self.cfg, self.metrics)
        (grad,) = torch.autograd.grad(loss.sum(), flat)
        with torch.no_grad():
            adam_update(flat, grad, m, v, t, lr, active=active)
        return loss.detach(), held, mask_logits.detach()

    def __call__(self, unet: StackedUNet, opt: StackedAdam, x, label, targets, thresholds, backgrounds,
                 active=None, base=None):
        """One step of ``unet`` with ``opt``; returns ``(loss [N], held [N], mask_logits [N,1,H,W])``."""
        if not self.compiled:
            return self._eager(unet, opt, x, label, targets, thresholds, backgrounds, active, base)
        (flat,) = unet.parameters()
        with _COMPILE_LOCK:
            return self._fn(flat, opt.m, opt.v, opt.t, opt.lr_col, x, label, targets, thresholds, backgrounds, active,
                            base)

    def _eager(self, unet, opt, x, label, targets, thresholds, backgrounds, active, base):
        mask_logits = unet(x)
        if base is not None:
            mask_logits = mask_logits + base
        _, mask = straight_through(mask_logits, self.cfg, thresholds)
        loss, _, held = self.loss_fn(self.clf, x, label, mask, mask_logits, list(backgrounds.unbind(0)), targets,
                                     self.cfg, self.metrics)
        loss.sum().backward()   # into the kept gradient buffer
        opt.step(active)
        return loss.detach(), held, mask_logits.detach()

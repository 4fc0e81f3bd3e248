"""What ``explain`` and ``Explainer`` accept: the checks of their inputs, each a ValueError that
says what is wrong, and the old argument names kept for one release."""
from __future__ import annotations

import torch

from .._deprecation import warn_renamed

MIN_SIDE = 8


def validate_x(x) -> torch.Tensor:
    """``x`` ``[C,H,W]`` or ``[N,C,H,W]`` as ``[N,C,H,W]``; ValueError naming what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [C,H,W] or [N,C,H,W], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be [C,H,W] or [N,C,H,W], got rank {x.dim()} shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (N=0)")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point (preprocessed as the model expects), got {x.dtype}")
    if min(x.shape[2:]) < MIN_SIDE:
        raise ValueError(f"x is {x.shape[2]}x{x.shape[3]}; Med-CAM needs images of at least {MIN_SIDE}x{MIN_SIDE}")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or Inf values")
    return x


def validate_target(target, n: int, k: int, device) -> torch.Tensor | None:
    """None, or ``target`` (an int or ``[N]`` class indices below ``k``) as a long ``[N]`` tensor."""
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
        raise ValueError(f"target must be None, an int or a [N] tensor of class indices, got {type(target).__name__}")
    t = torch.as_tensor(target, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,) or t.is_floating_point():
        raise ValueError(f"target must be an int or a [N]={n} integer tensor, got shape {tuple(t.shape)} {t.dtype}")
    if int(t.min()) < 0 or int(t.max()) >= k:
        raise ValueError(f"target class indices must be in [0, {k}), got {t.tolist()}")
    return t.long()


def validate_refine(refine, amortised) -> int:
    """``refine`` fit steps (an int >= 0, only with an amortised explainer)."""
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0 (per-image fit steps), got {refine!r}")
    if refine and amortised is None:
        raise ValueError("refine warm-starts the fit from an amortised explainer's mask: pass amortised=...")
    return refine


def renamed_arguments(mode: str, counterfactuals, reference):
    """The old ``mode="reference"`` and ``reference=`` images, for one release (warned)."""
    if mode == "reference":
        warn_renamed('mode="reference"', 'mode="paper"', stacklevel=4)
        mode = "paper"
    if reference is not None:
        warn_renamed("reference= (the counterfactual images)", "counterfactuals=", stacklevel=4)
        if counterfactuals is not None:
            raise ValueError("give counterfactuals= only (reference= is its old name)")
        counterfactuals = reference
    return mode, counterfactuals

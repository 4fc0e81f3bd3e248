"""Input checks and the batched classifier call shared by the metrics."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

Forward = Callable[[Tensor], Tensor]
SCORES = ("prob", "logit")


def check_images(x, name: str = "x") -> Tensor:
    """``x`` must be a floating ``[N,C,H,W]`` tensor with N >= 1."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [N,C,H,W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N,C,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image")
    return x


def check_maps(t, name: str, n: int | None = None, hw: tuple[int, int] | None = None,
               require_bool: bool = False, device=None) -> Tensor:
    """A per-pixel map ``[N,H,W]`` (a singleton channel ``[N,1,H,W]`` is squeezed).

    Float maps must be finite; ``require_bool`` demands a bool tensor (no silent casting)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [N,H,W], got {type(t).__name__}")
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must be [N,H,W] (or [N,1,H,W]), got shape {tuple(t.shape)}")
    if require_bool and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if t.dtype != torch.bool and not t.is_floating_point():
        raise ValueError(f"{name} must be bool or floating, got {t.dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    if t.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one map")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} maps, expected {n}")
    if hw is not None and tuple(t.shape[1:]) != tuple(hw):
        raise ValueError(f"{name} is {tuple(t.shape[1:])} per map, expected {tuple(hw)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t


def check_labels(label, n: int, device) -> Tensor:
    """An int (broadcast to all N) or an integer ``[N]`` tensor → long ``[N]`` on ``device``."""
    if isinstance(label, bool):
        raise ValueError("label must be an int or an integer [N] tensor, got bool")
    if isinstance(label, int):
        return torch.full((n,), label, dtype=torch.long, device=device)
    if not isinstance(label, Tensor):
        raise ValueError(f"label must be an int or an integer [N] tensor, got {type(label).__name__}")
    if label.dtype == torch.bool or label.is_floating_point() or label.is_complex():
        raise ValueError(f"label must hold integer class indices, got {label.dtype}")
    if label.dim() != 1 or label.shape[0] != n:
        raise ValueError(f"label must be [N] with N={n}, got shape {tuple(label.shape)}")
    if bool((label < 0).any()):
        raise ValueError("label must be non-negative class indices")
    return label.to(device=device, dtype=torch.long)


def check_batch_size(batch_size) -> int:
    """A positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_score(score: str) -> str:
    """``"prob"`` (softmax p(label)) or ``"logit"``."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


@torch.no_grad()
def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's, or the CPU allocator's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


@torch.no_grad()
def batched_logits(forward: Forward, x: Tensor, batch_size: int) -> Tensor:
    """``forward`` over ``x`` ``[B,C,H,W]`` in chunks of ``batch_size`` → logits ``[B,K]``.

    ValueError unless each chunk gives ``[b,K]``; a chunk that runs out of memory is retried at half
    the size (down to one image, then the error is raised)."""
    if x.shape[0] == 0:
        raise ValueError("batched_logits needs at least one input")
    out, i, size = [], 0, batch_size
    while i < x.shape[0]:
        chunk = x[i:i + size]
        try:
            logits = forward(chunk)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc) or size == 1:
                raise
            if x.is_cuda:
                torch.cuda.empty_cache()
            size //= 2
            warnings.warn(f"medcam_fast: out of memory classifying {2 * size} images at once; halving to {size}",
                          RuntimeWarning, stacklevel=2)
            continue
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != chunk.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"forward must map [B,C,H,W] to logits [B,K], got {got}")
        out.append(logits)
        i += chunk.shape[0]
    return torch.cat(out)


def class_score(logits: Tensor, label: Tensor, score: str) -> Tensor:
    """``[B,K]`` logits → ``[B]``: softmax p(label) (``"prob"``) or the raw logit (``"logit"``)."""
    if bool((label >= logits.shape[1]).any()):
        raise ValueError(f"label must be < K={logits.shape[1]} (the classifier's class count)")
    vals = logits.softmax(dim=1) if score == "prob" else logits
    return vals.gather(1, label[:, None])[:, 0]


def stable_rank_desc(values: Tensor) -> Tensor:
    """``[N,M]`` → long ``[N,M]``: 0 for the largest value; ties go to the lower index first."""
    order = values.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    return rank

"""Saliency of a :class:`~medcam_fast.patchnet.PatchNet`: its own patch logits, no post-hoc method.

Three maps, all ``[N, H, W]`` for an input ``[N, C, H, W]`` and one target class per image:

- **raw**: the target class's logit of each ``p x p`` patch, upsampled nearest to pixels. Because the
  image logit is the plain mean of the patch logits, the mean of the raw map over the image *is* the
  image logit of the target class.
- **scaled**: the raw map times the image's predicted probability of the target class,
  ``softmax(image_logits)[target]`` (``image_logits = model(x)``). MedicalPatchNet (Wienholt et al.,
  2025; ``forwardScaledPatches`` in the authors' code) scales by the predicted probability of the class;
  the authors' CheXpert model is multi-label and uses ``sigmoid``, the classifiers here are
  single-label, hence ``softmax``. Within one image this is a positive constant factor: it changes
  the map's magnitude (so maps of confident and unconfident images compare), never its ranking.
- **shifted-grid smoothed** (:func:`shifted_patch_saliency`): the blocky map averaged over copies of
  the image whose patch grid is shifted by multiples of an offset ``o``; see that function.

The target defaults to the class the model predicts for the (unshifted) image.
Call ``model.eval()`` first: in train mode BatchNorm statistics would be taken over the patch batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..patchnet import PatchNet

__all__ = ["raw_patch_saliency", "scaled_patch_saliency", "patch_saliency", "shifted_patch_saliency",
           "shift_offsets", "SaliencyCost", "SmoothedSaliency"]

_MODES = ("raw", "scaled")


@dataclass(frozen=True)
class SaliencyCost:
    """What a saliency computation cost.

    Attributes:
        copies: shifted copies of each image, ``(p/o)**2``.
        patches_per_copy: patches per image, ``P = (H/p) * (W/p)``.
        patch_evaluations: backbone evaluations of single ``p x p`` patches, ``copies * N * P``.
        backbone_passes: calls of the backbone, ``ceil(patch_evaluations / batch_size)``.
        seconds: wall-clock time of the whole computation.
    """

    copies: int
    patches_per_copy: int
    patch_evaluations: int
    backbone_passes: int
    seconds: float


class SmoothedSaliency(NamedTuple):
    """Result of :func:`shifted_patch_saliency`; unpacks as ``saliency, cost``."""

    saliency: torch.Tensor  # [N, H, W]
    cost: SaliencyCost


def _check_model(model) -> PatchNet:
    if not isinstance(model, PatchNet):
        raise TypeError(f"model must be a medcam_fast.patchnet.PatchNet, got {type(model).__name__}")
    return model


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _resolve_target(target, image_logits: torch.Tensor) -> torch.Tensor:
    """Target classes as a LongTensor ``[N]`` on the logits' device; ``None`` -> predicted class."""
    n, k = image_logits.shape
    if target is None:
        return image_logits.argmax(dim=1)
    t = torch.as_tensor(target, device=image_logits.device)
    if t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"target must be an int or integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target must be an int or have shape [{n}], got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t >= k)).any()):
        raise ValueError(f"target classes must lie in [0, {k}), got {t.tolist()}")
    return t


def _patch_map(patch_logits: torch.Tensor, target: torch.Tensor, mode: str, p: int) -> torch.Tensor:
    """``[N, K, gh, gw]`` patch logits -> ``[N, gh*p, gw*p]`` raw or scaled map of ``target``."""
    n = patch_logits.shape[0]
    rows = torch.arange(n, device=patch_logits.device)
    sal = patch_logits[rows, target]  # [N, gh, gw]
    if mode == "scaled":
        prob = torch.softmax(patch_logits.mean(dim=(2, 3)), dim=1)[rows, target]  # [N]
        sal = sal * prob[:, None, None]
    return sal.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)


@torch.no_grad()
def patch_saliency(model: PatchNet, x: torch.Tensor, target=None, mode: str = "raw") -> torch.Tensor:
    """Raw or scaled patch saliency ``[N, H, W]`` of ``x`` ``[N, C, H, W]`` (one backbone pass).

    Args:
        model: the PatchNet (in eval mode).
        x: images ``[N, C, H, W]``, ``H`` and ``W`` multiples of ``model.patch_size``.
        target: ``None`` (the predicted class), an int, or ``[N]`` class indices.
        mode: ``"raw"`` (patch logits of the target) or ``"scaled"`` (times the image's softmax
            probability of the target).
    """
    model, mode = _check_model(model), _check_mode(mode)
    logits = model.patch_logits(x)
    t = _resolve_target(target, logits.mean(dim=(2, 3)))
    return _patch_map(logits, t, mode, model.patch_size)


def raw_patch_saliency(model: PatchNet, x: torch.Tensor, target=None) -> torch.Tensor:
    """Patch logits of the target class, nearest-upsampled: ``[N, C, H, W]`` -> ``[N, H, W]``."""
    return patch_saliency(model, x, target, mode="raw")


def scaled_patch_saliency(model: PatchNet, x: torch.Tensor, target=None) -> torch.Tensor:
    """Raw patch saliency times ``softmax(model(x))[n, target[n]]`` per image: ``[N, H, W]``."""
    return patch_saliency(model, x, target, mode="scaled")


def shift_offsets(patch_size: int, offset: int) -> list[int]:
    """The grid shifts along one axis: the ``p/o`` multiples of ``o`` in ``[0, p)``, moved into the
    centred range ``[-p/2, p/2)`` (as in the authors' code, so the cropped margins are spread over both
    sides of the image). Always contains 0; ``o = p`` gives ``[0]``. Sorted ascending."""
    for name, v in (("patch_size", patch_size), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if patch_size % offset:
        raise ValueError(f"offset {offset} must divide the patch size {patch_size}")
    half = patch_size // 2
    return sorted(((k * offset + half) % patch_size) - half for k in range(patch_size // offset))


@torch.no_grad()
def shifted_patch_saliency(model: PatchNet, x: torch.Tensor, offset: int, target=None, mode: str = "raw",
                           batch_size: int = 1024) -> SmoothedSaliency:
    """Patch saliency averaged over shifted patch grids (MedicalPatchNet's smoothing): ``[N, H, W]``.

    For every pair ``(dy, dx)`` of :func:`shift_offsets` (``(p/o)**2`` pairs) the copy
    ``x_s[..., u, v] = x[..., u + dy, v + dx]`` (ZERO where ``u + dy`` or ``v + dx`` falls outside the
    image) has the same size as ``x``; so its patch grid covers the image shifted by ``(dy, dx)``. Its
    raw or scaled patch map (scaled: by that copy's own softmax probability of the target, as the
    authors do) is shifted back, ``m_s[u, v] = map_s[u - dy, v - dx]``, and the copies are averaged.

    Padding: zeros are what the backbone sees in the padded margin of a copy, so border patches of a
    copy are partly zero images and their logits count for the real pixels they contain. A copy
    contributes to an output pixel only if that pixel lies inside the copy (was not cropped off by the
    shift); each output pixel is the mean over the copies that contain it. Interior pixels (at least
    ``p/2`` from every border) are averaged over all copies; a pixel at a border over at least half of
    them per axis. (The authors' code divides by the number of copies everywhere, i.e. counts cropped
    pixels as saliency 0, which pulls border values towards 0.)

    All patches of all copies of all images are evaluated in
    ``ceil((p/o)**2 * N * P / batch_size)`` backbone calls of at most ``batch_size`` patches; copies
    are cut lazily, so memory stays around ``batch_size`` patches plus one copy of the batch.

    ``o = p`` gives one copy with no shift: the direct patch map of :func:`patch_saliency`,
    bit-identical when ``batch_size >= N*P`` (one backbone call on the same patches), otherwise equal up
    to the backbone's floating-point dependence on batch composition.

    Args:
        model: the PatchNet (in eval mode).
        x: images ``[N, C, H, W]``, ``H`` and ``W`` multiples of ``p = model.patch_size``.
        offset: ``o``, the grid shift step in pixels; must divide ``p``.
        target: ``None`` (class predicted for the unshifted image), an int, or ``[N]`` class indices.
        mode: ``"raw"`` or ``"scaled"``.
        batch_size: most patches per backbone call.

    Returns:
        :class:`SmoothedSaliency` ``(saliency [N, H, W], cost)``.
    """
    t0 = time.perf_counter()
    model, mode = _check_model(model), _check_mode(mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    p = model.patch_size
    steps = shift_offsets(p, offset)
    gh, gw = model.grid_size(x)
    n, _, h, w = x.shape
    npatch = gh * gw
    shifts = [(dy, dx) for dy in steps for dx in steps]
    half = p // 2
    xp = F.pad(x, (half, half, half, half)) if half and len(steps) > 1 else x

    # --- all patches of all copies through the backbone, in chunks of batch_size -------------------
    outputs: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    n_pending = 0
    passes = 0

    def run(final: bool) -> None:
        nonlocal pending, n_pending, passes
        if not pending or (n_pending < batch_size and not final):
            return
        buf = pending[0] if len(pending) == 1 else torch.cat(pending)
        start = 0
        while buf.shape[0] - start >= batch_size or (final and start < buf.shape[0]):
            chunk = buf[start:start + batch_size]
            outputs.append(model.backbone(chunk))
            passes += 1
            start += chunk.shape[0]
        pending = [buf[start:]] if start < buf.shape[0] else []
        n_pending = buf.shape[0] - start

    for dy, dx in shifts:
        copy = x if (dy, dx) == (0, 0) else xp[..., half + dy:half + dy + h, half + dx:half + dx + w]
        pending.append(model.patchify(copy))
        n_pending += n * npatch
        run(final=False)
    run(final=True)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [S*N*P, K]
    k = out.shape[1] if out.dim() == 2 else -1
    if out.dim() != 2 or out.shape[0] != len(shifts) * n * npatch or k != model.num_classes:
        raise ValueError(f"backbone must map [B, C, p, p] to [B, {model.num_classes}], got {tuple(out.shape)}")
    per_copy = out.split(n * npatch)

    # --- target from the unshifted copy, then shift each map back and average ------------------------
    i0 = shifts.index((0, 0))
    logits0 = per_copy[i0].reshape(n, gh, gw, k).permute(0, 3, 1, 2)  # same ops as PatchNet.patch_logits
    tgt = _resolve_target(target, logits0.mean(dim=(2, 3)))
    if len(shifts) == 1:
        sal = _patch_map(logits0, tgt, mode, p)
    else:
        acc = x.new_zeros(n, h, w, dtype=out.dtype)
        count = x.new_zeros(h, w, dtype=out.dtype)
        for (dy, dx), o_s in zip(shifts, per_copy):
            m = _patch_map(o_s.reshape(n, gh, gw, k).permute(0, 3, 1, 2), tgt, mode, p)  # copy coordinates
            ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))  # output pixels
            yc, xc = slice(max(-dy, 0), h - max(dy, 0)), slice(max(-dx, 0), w - max(dx, 0))  # in the copy
            acc[:, ys, xs] += m[:, yc, xc]
            count[ys, xs] += 1
        sal = acc / count
    cost = SaliencyCost(copies=len(shifts), patches_per_copy=npatch, patch_evaluations=len(shifts) * n * npatch,
                        backbone_passes=passes, seconds=time.perf_counter() - t0)
    return SmoothedSaliency(sal, cost)

"""MedicalPatchNet: a patch-based, self-explaining image classifier (Wienholt et al., 2025).

The image is cut into non-overlapping ``p x p`` patches; one shared backbone classifies every patch on
its own (it never sees the rest of the image), and the image logits are the plain mean of the patch
logits. There is no learned aggregation, so each patch's logits are its exact additive share of the
image decision and double as a saliency map (see :mod:`medcam_fast.baselines.patchnet_saliency`).

Reference: P. Wienholt, C. Kuhl, J. N. Kather, S. Nebelung, D. Truhn, "MedicalPatchNet: A Patch-Based
Self-Explainable AI Architecture for Chest X-ray Classification", arXiv:2509.07477 (2025),
Sci. Rep. 16, 7467 (2026).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchNet"]


class PatchNet(nn.Module):
    """Classify each ``p x p`` patch with one backbone and average the patch logits.

    Args:
        backbone: a timm model name (created with ``pretrained=False, num_classes=num_classes,
            in_chans=in_chans``; no hub download) or an ``nn.Module`` that maps ``[B, C, p, p]`` to
            ``[B, K]``.
        patch_size: ``p``, the side of a square patch in pixels. Input height and width must be
            multiples of it.
        num_classes: ``K``, the number of classes (logits per patch and per image).
        in_chans: ``C``, the number of input channels.

    Shapes (``P = (H/p) * (W/p)`` patches per image):
        - input ``x``: ``[N, C, H, W]``
        - :meth:`patchify`: ``[N*P, C, p, p]`` (row-major patch order inside each image)
        - :meth:`patch_logits`: ``[N, K, H/p, W/p]``
        - :meth:`forward`: ``[N, K]`` = ``patch_logits(x).mean(dim=(2, 3))``

    All patches of the whole batch go through the backbone in one pass, so forward hooks on backbone
    layers see ``N*P`` samples. The module uses only tensor ops and Python-int shape arithmetic, so it
    traces (``torch.jit.trace``, ``torch.onnx.export``, ``torch.export``) at a fixed input size.
    Put the model in ``eval()`` for inference: in train mode, BatchNorm statistics are taken over
    patches.
    """

    def __init__(self, backbone: str | nn.Module, patch_size: int, num_classes: int, in_chans: int = 3):
        super().__init__()
        for name, value in (("patch_size", patch_size), ("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(backbone, str):
            import timm

            backbone = timm.create_model(backbone, pretrained=False, num_classes=num_classes, in_chans=in_chans)
            head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
            if isinstance(head, nn.Linear):
                # as for plain classifiers in zoo.cards.build_model: timm's fan-out head init gives large
                # start logits; begin near uniform instead
                nn.init.normal_(head.weight, std=0.01)
                nn.init.zeros_(head.bias)
        elif not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.in_chans = in_chans

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, num_classes={self.num_classes}, in_chans={self.in_chans}"

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Check ``x`` (``[N, C, H, W]``, ``C == in_chans``, ``H`` and ``W`` multiples of ``p``) and
        return the patch grid ``(H/p, W/p)``. Raises ``ValueError`` otherwise."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"PatchNet expects a tensor [N, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"PatchNet expects a 4-d tensor [N, C, H, W], got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.patch_size
        if torch.jit.is_tracing():  # sizes are traced values here: checking them would freeze them in the trace
            return h // p, w // p
        if c != self.in_chans:
            raise ValueError(f"PatchNet expects {self.in_chans} channels, got {c} (input shape {tuple(x.shape)})")
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"input height and width ({h}x{w}) must be positive multiples of the patch size {p}")
        return h // p, w // p

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N*P, C, p, p]``; patch ``(i, j)`` of image ``n`` sits at row
        ``n*P + i*(W/p) + j``."""
        gh, gw = self.grid_size(x)
        n, c = x.shape[0], x.shape[1]
        p = self.patch_size
        return (x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
                .reshape(n * gh * gw, c, p, p))

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every patch on its own: ``[N, C, H, W]`` -> ``[N, K, H/p, W/p]`` (one backbone pass)."""
        gh, gw = self.grid_size(x)
        n = x.shape[0]
        out = self.backbone(self.patchify(x))
        if not torch.jit.is_tracing():  # (see grid_size)
            if out.dim() != 2 or out.shape[0] != n * gh * gw or out.shape[1] != self.num_classes:
                raise ValueError(f"backbone must map [B, C, p, p] to [B, {self.num_classes}]; got "
                                 f"{tuple(out.shape)} for B={n * gh * gw}")
        return out.reshape(n, gh, gw, self.num_classes).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image logits ``[N, K]``: the plain mean of the patch logits over all ``P`` patches."""
        return self.patch_logits(x).mean(dim=(2, 3))

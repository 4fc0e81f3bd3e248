"""A classifier's identity: the hash that amortised explainers, run manifests and the evaluation's
caches are keyed by (never a file name: two files may hold one model, one file two models)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def classifier_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the classifier's state dict: every name, dtype, shape and
    value. Any change of weights or BatchNorm statistics gives another fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]

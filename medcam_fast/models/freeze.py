"""Freezing a user's classifier for the length of a block, and restoring it exactly."""
from __future__ import annotations

import threading
from contextlib import contextmanager

from torch import nn


class _FreezeState:
    """Reference-counted freezing: the first user freezes, the last one restores."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.saved = None


_FREEZE: dict[int, _FreezeState] = {}
_FREEZE_LOCK = threading.Lock()


@contextmanager
def frozen(model: nn.Module):
    """Puts ``model`` in eval mode with no parameter gradients, then restores every module's
    training flag and every parameter's ``requires_grad`` exactly, also on error. Nested and
    concurrent uses on one model are counted: only the last exit restores."""
    with _FREEZE_LOCK:
        state = _FREEZE.setdefault(id(model), _FreezeState())
    with state.lock:
        if state.count == 0:
            state.saved = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        state.count += 1
    try:
        yield model
    finally:
        with state.lock:
            state.count -= 1
            if state.count == 0:
                flags, grads = state.saved
                for m, f in zip(model.modules(), flags):
                    m.training = f
                for p, g in zip(model.parameters(), grads):
                    p.requires_grad_(g)
                state.saved = None
                with _FREEZE_LOCK:
                    _FREEZE.pop(id(model), None)

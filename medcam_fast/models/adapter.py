"""The frozen-classifier adapter: activation hooks that are always released (context managers),
safe to share between threads, around a model frozen by :func:`models.freeze.frozen`."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

from .freeze import frozen
from .layers import default_layers, default_weights


def _as_map(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise ValueError(f"hooked layer returned {type(out).__name__}, not a tensor")
    return out


class ActivationCapture:
    """Forward hooks on named modules; each thread sees only its own forward's activations.

    Use as a context manager (hooks registered on enter, removed on exit, also on error), then
    ``recording()`` around a forward pass fills ``{name: [B,C,h,w]}``. ViT token outputs
    ``[B,T,D]`` are reshaped to ``[B,D,h,w]`` (prefix tokens dropped), pooled ``[B,D]`` to ``[B,D,1,1]``.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"model has no module(s) named {missing}; some valid names: {list(modules)[1:12]}")
        self.model = model
        self.layers = list(layers)
        self._modules = [modules[n] for n in layers]
        self._prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()
        self._users = 0

    def _hook(self, name):
        def hook(module, inputs, output):
            store = getattr(self._local, "store", None)
            if store is not None:
                store[name] = self._to_map(_as_map(output))
        return hook

    def _to_map(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:  # pooled features [B, D] -> [B, D, 1, 1]
            return t[:, :, None, None]
        if t.dim() == 3:  # tokens [B, T, D] -> [B, D, h, w]
            t = t[:, self._prefix_tokens:]
            side = int(round(t.shape[1] ** 0.5))
            if side * side != t.shape[1]:
                raise ValueError(f"cannot reshape {t.shape[1]} tokens into a square grid")
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
        return t

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.layers, self._modules)]
            self._users += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for h in self._handles:
                    h.remove()
                self._handles = []
        return False

    @contextmanager
    def recording(self):
        """Records this thread's forward passes inside the block; yields the dict being filled."""
        store: dict = {}
        self._local.store = store
        try:
            yield store
        finally:
            self._local.store = None


class FrozenClassifier:
    """A frozen view of a user's classifier: logits plus the chosen layers' activations.

    Args:
        model: maps ``[N,C,H,W]`` to logits ``[N,K]``.
        layers: module names to match (default: chosen per model family, see ``models.layers``).
        weights: per-layer weights, a list aligned with ``layers`` or ``{name: weight}``
            (default: growing with depth, 1-2-2-4-8 for five layers).
    """

    def __init__(self, model: nn.Module, layers=None, weights=None):
        self.model = model
        self._weights_arg = weights
        self.layers: list[str] | None = None
        self.weights: list[float] | None = None
        self.capture: ActivationCapture | None = None
        self._lock = threading.Lock()
        if layers:
            self._set_layers(list(layers))

    def _set_layers(self, layers: list[str]) -> None:
        weights = self._weights_arg
        if weights is None:
            w = default_weights(len(layers))
        elif isinstance(weights, dict):
            unknown = set(weights) - set(layers)
            if unknown:
                raise ValueError(f"layer_weights name layers not matched: {sorted(unknown)} (layers: {layers})")
            base = dict(zip(layers, default_weights(len(layers))))
            w = [float(weights.get(n, base[n])) for n in layers]
        else:
            w = [float(v) for v in weights]
            if len(w) != len(layers):
                raise ValueError(f"{len(w)} layer weights for {len(layers)} layers {layers}")
        self.capture = ActivationCapture(self.model, layers)
        self.layers, self.weights = layers, w

    def prepare(self, example: torch.Tensor) -> None:
        """Chooses the default layers (once) with ``example`` ``[N,C,H,W]`` for a dry run if needed."""
        if self.layers is None:
            with self._lock:
                if self.layers is None:
                    self._set_layers(default_layers(self.model, example))

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextmanager
    def session(self, example: torch.Tensor | None = None):
        """Freezes the model and registers the hooks for the block; restores both on exit."""
        if self.layers is None:
            if example is None:
                raise ValueError("FrozenClassifier.session needs an example input to choose its layers")
            self.prepare(example)
        with frozen(self.model), self.capture:
            yield self

    def forward(self, x: torch.Tensor, with_activations: bool = False):
        """Logits ``[B,K]`` (and ``{layer: [B,C,h,w]}`` when asked). Call inside :meth:`session`."""
        if not with_activations:
            return self.model(x)
        with self.capture.recording() as store:
            logits = self.model(x)
        return logits, [store[n] for n in self.layers]

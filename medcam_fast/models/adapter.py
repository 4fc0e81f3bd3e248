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
    def session(self, example: torch.Tensor | None = None, channels_last: bool = False):
        """Freezes the model and registers the hooks for the block; restores both on exit
        (``channels_last``: see :func:`~medcam_fast.models.freeze.frozen`)."""
        if self.layers is None:
            if example is None:
                raise ValueError("FrozenClassifier.session needs an example input to choose its layers")
            self.prepare(example)
        with frozen(self.model, channels_last), self.capture:
            yield self

    def traced(self, channels_last: bool = False) -> "TracedClassifier":
        """The same classifier as one FX graph that returns the logits and the chosen layers'
        outputs, with no hooks and no thread-local state (what ``torch.compile(fullgraph=True)``
        can trace), BatchNorms folded into their convolutions. Traced once; it shares the model's
        other modules and parameters, and the folded weights are recomputed from the model's on
        every call (call it inside :meth:`session`). ValueError where FX cannot trace the model."""
        with self._lock:
            if getattr(self, "_traced", None) is None:
                self._traced = TracedClassifier(self)
            return self._traced.refresh(channels_last)

    @property
    def traced_graph(self) -> "TracedClassifier":
        """The traced view built by :meth:`traced` (no refresh)."""
        return self._traced

    def forward(self, x: torch.Tensor, with_activations: bool = False):
        """Logits ``[B,K]`` (and ``{layer: [B,C,h,w]}`` when asked). Call inside :meth:`session`."""
        if not with_activations:
            return self.model(x)
        with self.capture.recording() as store:
            logits = self.model(x)
        return logits, [store[n] for n in self.layers]


def fold_batchnorm(gm: torch.fx.GraphModule) -> list[tuple]:
    """Folds every BatchNorm that follows a plain Conv2d into that convolution, in the graph
    module ``gm`` (a BatchNorm with an activation, timm's ``BatchNormAct2d``, keeps its
    activation). The folded convolutions are new modules of ``gm`` only: the model the graph was
    traced from keeps its own. Returns ``(conv, bn, folded conv)`` triples for
    :func:`refresh_folds`.

    A frozen classifier's BatchNorm (eval mode) is an affine map; folded, the gradient pass skips
    its forward and backward."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(gm.named_modules())
    folds = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        bn, src = modules[node.target], node.args[0]
        if type(bn) not in _FOLDABLE_NORMS or bn.training or not bn.track_running_stats \
                or getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv = modules[src.target]
        if type(conv) is not nn.Conv2d:
            continue
        fused = fuse_conv_bn_eval(conv, bn).requires_grad_(False)   # a copy of conv, BN folded in
        gm.add_submodule(src.target, fused)
        if type(bn) is nn.BatchNorm2d:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:   # BatchNormAct2d: what is left is drop(act(.)); identities in eval mode but the act
            name = f"{node.target}.after_fold"
            gm.add_submodule(name, nn.Sequential(bn.drop, bn.act))
            node.target = name
        folds.append((conv, bn, fused))
    gm.graph.lint()
    gm.recompile()
    return folds


@torch.no_grad()
def refresh_folds(folds, channels_last: bool = False) -> None:
    """Recomputes the folded weights from the model's current ones (they may have been trained
    since), in place, so the graph's modules stay the same objects (a compiled step is reused)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for conv, bn, fused in folds:
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        if fused.weight.shape != w.shape or not fused.weight.is_contiguous(memory_format=fmt):
            fused.weight = nn.Parameter(torch.empty_like(w, memory_format=fmt), requires_grad=False)
        fused.weight.copy_(w)
        fused.bias.copy_(b)


def _foldable_norms() -> tuple:
    kinds = [nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d
        kinds.append(BatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(kinds)


_FOLDABLE_NORMS = _foldable_norms()


class TracedClassifier:
    """:meth:`FrozenClassifier.traced`: ``forward(x, with_activations)`` as the hooked one, from an
    FX feature extractor (timm's, which knows timm's untraceable layers, else torchvision's), with
    eval-mode BatchNorms folded into their convolutions (``fold``)."""

    def __init__(self, clf: FrozenClassifier, fold: bool = True):
        try:
            from timm.models import create_feature_extractor   # timm's leaf modules registered
        except ImportError:   # pragma: no cover - timm is a dependency
            from torchvision.models.feature_extraction import create_feature_extractor
        from torchvision.models.feature_extraction import get_graph_node_names

        model = clf.model
        self.layers, self.weights, self._to_map = clf.layers, clf.weights, clf.capture._to_map
        was = model.training
        # tracing in train mode runs BatchNorm's num_batches_tracked.add_(1) on the real buffer (it
        # is not a proxy): every buffer is put back as it was, the model is left untouched
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        model.eval()
        try:
            nodes = get_graph_node_names(model)[1]
            self._out = nodes[-1]
            self.graph = create_feature_extractor(model, return_nodes=[*self.layers, self._out])
        except Exception as exc:  # FX raises many kinds (TraceError, TypeError, ...)
            raise ValueError(f"compile=True needs a model that torch.fx can trace: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        finally:
            model.train(was)
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)
        self.graph.eval()
        self.folds = fold_batchnorm(self.graph) if fold else []

    def refresh(self, channels_last: bool = False) -> "TracedClassifier":
        """Brings the folded weights up to the model's current ones (call once per session)."""
        refresh_folds(self.folds, channels_last)
        return self

    def forward(self, x: torch.Tensor, with_activations: bool = False):
        """Logits ``[B,K]`` (and the layers' activations ``[B,C,h,w]``, as the hooks give them)."""
        out = self.graph(x)
        logits = out[self._out]
        if not with_activations:
            return logits
        return logits, [self._to_map(_as_map(out[n])) for n in self.layers]


def check_traced(traced, x: torch.Tensor, hooked) -> None:
    """ValueError unless the traced view gives the hooked view's logits and activations ``hooked``
    ``(logits [N,K], [activations])`` on ``x`` (up to the rounding of the folded BatchNorms)."""
    with torch.no_grad():
        try:
            b = traced.forward(x, with_activations=True)
        except RuntimeError as exc:
            raise ValueError(f"the traced classifier fails where the model runs: {exc}") from exc
    for u, v in zip([hooked[0], *hooked[1]], [b[0], *b[1]]):
        if u.shape != v.shape or not torch.allclose(u, v, rtol=1e-3, atol=1e-4 * float(u.abs().max()) + 1e-6):
            raise ValueError("the traced classifier does not reproduce the model's outputs; "
                             "use classifier_path='hooks'")


def traced_or_hooks(clf: "FrozenClassifier", x: torch.Tensor, channels_last: bool):
    """The traced view of ``clf`` (BatchNorms folded) where it reproduces the hooks on ``x``
    ``[N,C,H,W]``, else ``clf`` itself (the hooks)."""
    with torch.no_grad():
        hooked = clf.forward(x, with_activations=True)
    try:
        view = clf.traced(channels_last)
        check_traced(view, x, hooked)
        return view
    except ValueError:
        return clf

"""The classifier adapter: layer choice per model family, hooks, freezing."""
from .adapter import ActivationCapture, FrozenClassifier, frozen
from .layers import default_layers, default_weights, register_layers

__all__ = ["ActivationCapture", "FrozenClassifier", "default_layers", "default_weights", "frozen", "register_layers"]

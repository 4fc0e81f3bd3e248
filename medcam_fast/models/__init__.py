"""The classifier adapter: layer choice per model family, hooks, freezing."""
from .adapter import ActivationCapture, FrozenClassifier, frozen
from .fingerprint import classifier_fingerprint
from .layers import default_layers, default_weights, register_layers

__all__ = ["ActivationCapture", "FrozenClassifier", "classifier_fingerprint", "default_layers", "default_weights", "frozen", "register_layers"]

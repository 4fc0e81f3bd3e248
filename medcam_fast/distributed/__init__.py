"""Screening at scale on Ray: one worker class (:class:`ExplainWorker`) holds an :class:`Explainer`
built inside its process from a model spec, and Ray Serve (requests) and Ray Data (archives) wrap it.

    pip install -e ".[ray]"          # Ray is an extra: the base install stays light
    from medcam_fast.distributed import ModelSpec, explain_dataset, serve_explainer, ServeClient

    rows = explain_dataset(["scans/"], ModelSpec("demo"), out="explained/", workers=2)   # Parquet, resumable
    client = ServeClient(serve_explainer(ModelSpec("demo"), replicas=2))
    future = client.submit(x)        # x [C,H,W] preprocessed; Future -> ExplainResult

Only model specs, configs and numpy arrays cross process boundaries: no torch tensor (and so no
CUDA tensor) is pickled. :class:`ExplainWorker` also runs without Ray (``workers=0``), the
in-process baseline every Ray figure is compared with.
"""
from __future__ import annotations

from .worker import ExplainResult, ExplainWorker, ModelSpec, pack_mask, unpack_mask

__all__ = ["ExplainResult", "ExplainWorker", "ModelSpec", "ServeClient", "explain_dataset", "pack_mask",
           "read_results", "require_ray", "serve_explainer", "unpack_mask"]

_LAZY = {"ServeClient": "serve", "serve_explainer": "serve", "explain_dataset": "dataset", "read_results": "dataset"}


def require_ray():
    """The ``ray`` module, or ImportError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("medcam_fast.distributed needs Ray: pip install 'medcam_fast[ray]' "
                          f"(ray[serve,data]); import failed: {exc}") from exc
    return ray


def __getattr__(name):   # Serve and Data import Ray: only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

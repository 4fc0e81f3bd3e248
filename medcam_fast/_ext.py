"""Loads the compiled extension ``medcam_fast._C`` once, or explains why it is not used.

The build writes ``_build_info.json`` beside the binary. It is read *before* the binary is loaded,
so a binary built against another torch is never loaded (that could crash, not just fail). When
the extension is missing or mismatched we warn once and the ops fall back to ``ops.naive``.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path

import torch

# MEDCAM_FAST_BUILD_INFO points elsewhere (tests of the fallback use a missing file)
_INFO_PATH = Path(os.environ.get("MEDCAM_FAST_BUILD_INFO", Path(__file__).with_name("_build_info.json")))
_state: dict | None = None


def _load() -> dict:
    info = {"cpu_ops": False, "cuda_ops": False, "torch": None, "cuda": None, "error": None}
    if os.environ.get("MEDCAM_FAST_DISABLE_EXT", "") == "1":
        info["error"] = "disabled by MEDCAM_FAST_DISABLE_EXT=1"
        return info
    try:
        built = json.loads(_INFO_PATH.read_text())
    except FileNotFoundError:
        info["error"] = "extension not built (no _build_info.json); run `pip install --no-build-isolation -e .`"
        return info
    except (OSError, ValueError) as exc:
        info["error"] = f"unreadable {_INFO_PATH.name}: {exc}"
        return info
    info["torch"], info["cuda"] = built.get("torch"), built.get("cuda")
    if built.get("torch") != torch.__version__:
        info["error"] = (f"extension built against torch {built.get('torch')}, running torch {torch.__version__}; "
                         "rebuild with `pip install --no-build-isolation -e .`")
        return info
    try:
        module = importlib.import_module("medcam_fast._C")
    except (ImportError, OSError) as exc:
        info["error"] = f"extension failed to load: {exc}"
        return info
    info["cpu_ops"] = hasattr(torch.ops.medcam_fast, "mask_priors") and hasattr(torch.ops.medcam_fast, "compose")
    info["cuda_ops"] = info["cpu_ops"] and bool(module.with_cuda)
    if not info["cpu_ops"]:
        info["error"] = "extension loaded but registered no ops"
    return info


def state() -> dict:
    """The extension's load state (computed once per process; warns once if it is not usable)."""
    global _state
    if _state is None:
        _state = _load()
        if _state["error"] and os.environ.get("MEDCAM_FAST_DISABLE_EXT", "") != "1":
            warnings.warn(f"medcam_fast: using the naive PyTorch ops: {_state['error']}", RuntimeWarning,
                          stacklevel=3)
    return _state


def build_info() -> dict:
    """Build facts of the compiled ops.

    Returns a dict with ``cpu_ops`` (bool: the CPU kernels are loaded and registered), ``cuda_ops``
    (bool: CUDA kernels were built and loaded), ``torch`` (the torch version built against, or None),
    ``cuda`` (the CUDA version built against, or None) and ``error`` (why the ops fall back, or None).
    """
    return dict(state())


def has_kernel(device: torch.device) -> bool:
    """Whether a compiled kernel serves tensors on ``device`` (else the naive twin is used)."""
    s = state()
    if device.type == "cpu":
        return s["cpu_ops"]
    if device.type == "cuda":
        return s["cuda_ops"]
    return False

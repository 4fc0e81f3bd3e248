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
    info = {"cpu_ops": False, "cuda_ops": False, "torch": None, "cuda": None, "cuda_arch_list": None,
            "cpu_isa": None, "cpu_isas": [], "error": None}
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
    info["cuda_arch_list"] = built.get("cuda_arch_list")
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
    try:  # a bad MEDCAM_FAST_CPU_ISA fails here, loudly, not at the first op
        info["cpu_isa"] = torch.ops.medcam_fast.cpu_isa()
    except RuntimeError as exc:
        raise RuntimeError(f"MEDCAM_FAST_CPU_ISA={os.environ.get('MEDCAM_FAST_CPU_ISA')!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    info["cpu_isas"] = torch.ops.medcam_fast.cpu_isas().split(",")
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
    ``cuda`` (the CUDA version built against, or None), ``cuda_arch_list`` (the archs the CUDA kernels
    were compiled for, as ``TORCH_CUDA_ARCH_LIST``, e.g. "8.0;9.0"; a GPU outside it uses the naive
    ops), ``cpu_isa`` (the CPU clone the kernels run now), ``cpu_isas`` (the clones this CPU can
    run, best first) and ``error`` (why the ops fall back, or None).
    """
    info = dict(state())
    if info["cpu_ops"]:
        info["cpu_isa"] = torch.ops.medcam_fast.cpu_isa()  # may have been set since loading
    return info


def _parse_arch_list(arch_list: str) -> list[tuple[int, int, bool, bool]]:
    """``"8.0;9.0+PTX 9.0a"`` -> [(8, 0, ptx, arch_specific), ...] (separators ; , or space)."""
    out = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        core = item[:-4] if ptx else item
        specific = core[-1:].lower() in ("a", "f")
        major, _, minor = core.rstrip("aAfF").partition(".")
        out.append((int(major), int(minor or 0), ptx, specific))
    return out


def cuda_arch_runs(capability: tuple[int, int], arch_list: str | None) -> bool:
    """Whether kernels compiled for ``arch_list`` run on a GPU of compute ``capability``.

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major), an arch-specific one (9.0a) only on
    its own arch; embedded PTX for compute_XY is JIT-compiled for any GPU of capability >= XY.
    """
    if not arch_list:
        return False
    major, minor = capability
    for a_major, a_minor, ptx, specific in _parse_arch_list(arch_list):
        if specific and (a_major, a_minor) == (major, minor):
            return True
        if not specific and a_major == major and a_minor <= minor:
            return True
        if ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_cuda_ok: dict[int, bool] = {}


def has_kernel(device: torch.device) -> bool:
    """Whether a compiled kernel serves tensors on ``device`` (else the naive twin is used)."""
    s = state()
    if device.type == "cpu":
        return s["cpu_ops"]
    if device.type == "cuda":
        if not s["cuda_ops"]:
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _cuda_ok:
            cap = _device_capability(torch.device("cuda", index))
            _cuda_ok[index] = cuda_arch_runs(cap, s["cuda_arch_list"])
            if not _cuda_ok[index]:
                warnings.warn(f"medcam_fast: the CUDA kernels were built for {s['cuda_arch_list']!r}, not for "
                              f"cuda:{index} (compute {cap[0]}.{cap[1]}); using the naive PyTorch ops there. "
                              "Rebuild with TORCH_CUDA_ARCH_LIST set for this GPU.", RuntimeWarning, stacklevel=3)
        return _cuda_ok[index]
    return False

"""Fused Med-CAM ops: mask priors and masked-input composition.

Each op validates its arguments (``ValueError`` naming the argument), then runs the compiled
kernel for the tensor's device when the extension provides one, else its twin in ``ops.naive``.

NaN behaviour (same for kernels and twins): values propagate as IEEE arithmetic. A NaN anywhere in
a sample's mask makes that sample's three prior columns NaN (a 1x1 mask has tv 0) and leaves other
samples untouched; ``compose`` computes ``m*x + (1-m)*b`` per element, so a NaN in x stays NaN even
where m is 0. In the fused backward, |d|' at a NaN difference is taken as 0 (the twin gives NaN).
"""
from __future__ import annotations

import contextlib
import numbers

import torch

from .. import _ext
from . import naive

__all__ = ["mask_priors", "compose", "naive", "cpu_isa", "cpu_isas", "set_cpu_isa", "forced_cpu_isa"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if _ext.state()["cpu_ops"]:
    from . import _registrations

    _registrations.register()


def cpu_isa() -> str | None:
    """The CPU clone the kernels run ("avx512", "avx2" or "scalar"); None without the extension."""
    return torch.ops.medcam_fast.cpu_isa() if _ext.state()["cpu_ops"] else None


def cpu_isas() -> list[str]:
    """The CPU clones this machine can run, best first (empty without the extension)."""
    return torch.ops.medcam_fast.cpu_isas().split(",") if _ext.state()["cpu_ops"] else []


def set_cpu_isa(isa: str) -> str:
    """Runs the CPU kernels' ``isa`` clone from now on ("auto", "avx512", "avx2" or "scalar"; the
    start value comes from ``MEDCAM_FAST_CPU_ISA``). Returns the clone now active. All clones give
    the same results bit for bit; this exists to test that. ValueError for a clone the CPU lacks."""
    if not _ext.state()["cpu_ops"]:
        raise ValueError(f"no compiled CPU kernels: {_ext.state()['error']}")
    try:
        return torch.ops.medcam_fast.set_cpu_isa(str(isa))
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


@contextlib.contextmanager
def forced_cpu_isa(isa: str):
    """Context manager: the kernels run the ``isa`` clone inside, the previous one after."""
    before = cpu_isa()
    set_cpu_isa(isa)
    try:
        yield
    finally:
        set_cpu_isa(before)


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def mask_priors(m: torch.Tensor, diagonal: bool = False, logits: bool = False,
                temperature: float = 1.0) -> torch.Tensor:
    """The three Med-CAM mask priors of each sample, fused into one pass (and one backward pass).

    Args:
        m: ``[N,1,H,W]`` mask in [0,1]; with ``logits=True``, the U-Net's raw logits.
        diagonal: add the two diagonal differences weighted 1/sqrt(2) (the authors' 8-neighbour TV).
        logits: fuse ``p = sigmoid(m / temperature)`` into the op.
        temperature: the sigmoid temperature (> 0), used with ``logits``.

    Returns:
        ``[N,3]`` in m's dtype: area = mean(p), binarisation = mean(p(1-p)),
        tv = mean|p[i+1,j]-p[i,j]| + mean|p[i,j+1]-p[i,j]| (a mean over no pairs is 0).
        Under autocast (a reduction, as torch's own) it computes and returns float32.
    """
    _check_float(m, "m")
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"m must be [N,1,H,W], got shape {tuple(m.shape)}")
    if m.shape[2] < 1 or m.shape[3] < 1:
        raise ValueError(f"m must have H, W >= 1, got shape {tuple(m.shape)}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if _ext.has_kernel(m.device):
        return torch.ops.medcam_fast.mask_priors(m, bool(diagonal), bool(logits), float(temperature))
    if torch.is_autocast_enabled(m.device.type):  # the kernels' autocast policy, for the twin
        with torch.autocast(m.device.type, enabled=False):
            return naive.mask_priors(m.float(), diagonal=diagonal, logits=logits, temperature=temperature)
    return naive.mask_priors(m, diagonal=diagonal, logits=logits, temperature=temperature)


def _baseline_for_kernel(baseline, x: torch.Tensor) -> torch.Tensor:
    """Brings a broadcastable baseline to the kernel's forms: ``[C]`` or x's full shape."""
    n, c, h, w = x.shape
    if baseline.dim() <= 4 and all(s == 1 for i, s in enumerate(baseline.shape[::-1]) if i != 2):
        # scalar, [C,1,1], [1,C,1,1] or a 1-element tensor: one value per channel
        if baseline.numel() == 1:
            return baseline.reshape(1).expand(c).contiguous()
        if baseline.dim() >= 3 and baseline.shape[-3] == c:
            return baseline.reshape(c)
    if baseline.dim() == 1 and baseline.shape[0] == c and w != c:
        return baseline
    return baseline.expand(n, c, h, w).contiguous()


def _normalise_baseline(baseline, x: torch.Tensor, mixed_ok: bool) -> torch.Tensor:
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.full((x.shape[1],), float(baseline), dtype=x.dtype, device=x.device)
    _check_float(baseline, "baseline")
    if baseline.device != x.device:
        raise ValueError(f"baseline is on {baseline.device}, x on {x.device}")
    if baseline.dtype != x.dtype and not mixed_ok:
        raise ValueError(f"baseline must have x's dtype {x.dtype}, got {baseline.dtype}")
    if baseline.dim() == 1 and baseline.shape[0] == x.shape[1] and baseline.shape[0] != 1:
        return baseline  # per-channel [C]
    try:
        torch.broadcast_shapes(baseline.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}; "
                         "use a number, [C], [C,1,1], [1,C,1,1] or [N,C,H,W]") from None
    if baseline.dim() > 4 or torch.broadcast_shapes(baseline.shape, x.shape) != x.shape:
        raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}")
    return _baseline_for_kernel(baseline, x)


def compose(x: torch.Tensor, m: torch.Tensor, baseline, background: torch.Tensor) -> torch.Tensor:
    """Evidence and robustness composites in one buffer, ready for a single classifier pass.

    Args:
        x: ``[N,C,H,W]`` images.
        m: ``[N,1,H,W]`` mask in [0,1].
        baseline: a number, ``[C]`` (per channel), or a tensor broadcastable to x
            (``[C,1,1]``, ``[1,C,1,1]``, ``[N,C,H,W]``, ...).
        background: ``[N,C,H,W]`` robustness background r.

    All tensors share x's dtype, except under autocast: there any float dtypes are taken (a bf16
    mask on a float32 image, say), computed in float32 and returned in x's dtype.

    Returns:
        ``[2N,C,H,W]``: rows ``0..N-1`` are ``e = m*x + (1-m)*baseline``, rows ``N..2N-1`` are
        ``e~ = m*x + (1-m)*background``. Backward gives dm (summed over channels) and dx when
        x requires grad.
    """
    _check_float(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be [N,C,H,W], got shape {tuple(x.shape)}")
    _check_float(m, "m")
    n, c, h, w = x.shape
    if m.dim() != 4 or tuple(m.shape) != (n, 1, h, w):
        raise ValueError(f"m must be [N,1,H,W] = {(n, 1, h, w)} for x, got shape {tuple(m.shape)}")
    _check_float(background, "background")
    if tuple(background.shape) != tuple(x.shape):
        raise ValueError(f"background must have x's shape {tuple(x.shape)}, got {tuple(background.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type)
    for name, t in (("m", m), ("background", background)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.dtype != x.dtype and not autocast:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    b = _normalise_baseline(baseline, x, mixed_ok=autocast)
    if _ext.has_kernel(x.device):
        return torch.ops.medcam_fast.compose(x, m, b, background)
    if b.dim() == 1:
        b = b.view(1, c, 1, 1)
    if autocast:  # the kernels' autocast policy, for the twin
        with torch.autocast(x.device.type, enabled=False):
            return naive.compose(x.float(), m.float(), b.float(), background.float()).to(x.dtype)
    return naive.compose(x, m, b, background)

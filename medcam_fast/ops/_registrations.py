"""Fake (meta) and autograd registrations of the compiled ops, so that
``torch.compile(fullgraph=True)`` traces forward and backward through them with no graph break."""
from __future__ import annotations

import torch

_LIB = "medcam_fast"


def register() -> None:
    """Registers fake kernels and autograd formulas; call once, after ``medcam_fast._C`` loaded."""

    @torch.library.register_fake(f"{_LIB}::mask_priors")
    def _mask_priors_fake(m, diagonal=False, logits=False, temperature=1.0):
        return m.new_empty((m.shape[0], 3))

    @torch.library.register_fake(f"{_LIB}::mask_priors_backward")
    def _mask_priors_backward_fake(grad, m, diagonal, logits, temperature):
        return torch.empty_like(m, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{_LIB}::compose")
    def _compose_fake(x, m, baseline, background):
        return x.new_empty((2 * x.shape[0], *x.shape[1:]))

    @torch.library.register_fake(f"{_LIB}::compose_backward")
    def _compose_backward_fake(grad, x, m, baseline, background, need_grad_x):
        grad_m = torch.empty_like(m, memory_format=torch.contiguous_format)
        grad_x = (torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x
                  else x.new_empty((0,)))
        return grad_m, grad_x

    def _priors_setup(ctx, inputs, output):
        m, diagonal, logits, temperature = inputs
        ctx.save_for_backward(m)
        ctx.opts = (diagonal, logits, temperature)

    def _priors_backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return torch.ops.medcam_fast.mask_priors_backward(grad, m, *ctx.opts), None, None, None

    torch.library.register_autograd(f"{_LIB}::mask_priors", _priors_backward, setup_context=_priors_setup)

    def _compose_setup(ctx, inputs, output):
        x, m, baseline, background = inputs
        ctx.save_for_backward(x, m, baseline, background)

    def _compose_backward(ctx, grad):
        x, m, baseline, background = ctx.saved_tensors
        need_x, need_m, need_b, need_r = ctx.needs_input_grad
        grad_m, grad_x = torch.ops.medcam_fast.compose_backward(grad, x, m, baseline, background, need_x)
        n = x.shape[0]
        # Baseline and background rarely need gradients; when they do, the formulas are one line each.
        grad_b = None
        if need_b:
            grad_b = grad[:n] * (1 - m)
            if baseline.dim() == 1:  # per-channel [C]
                grad_b = grad_b.sum(dim=(0, 2, 3))
        grad_r = grad[n:] * (1 - m) if need_r else None
        return (grad_x if need_x else None), (grad_m if need_m else None), grad_b, grad_r

    torch.library.register_autograd(f"{_LIB}::compose", _compose_backward, setup_context=_compose_setup)

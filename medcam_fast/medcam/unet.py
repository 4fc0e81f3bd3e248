"""The U-Net explainer, stacked: G independent U-Nets (one per image) in one set of tensors.

Every parameter has a leading group axis ``[G, ...]`` and runs as one grouped convolution, so a
batch of images is fitted by N independent networks in a single pass. Adam is elementwise, so
the result equals fitting each image alone. Groups can be dropped (``select``) when their image
finishes early.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _conv_params(gen, g, cin, cout, k, device, dtype, std=None, bias=0.0):
    std = math.sqrt(2.0 / (cin * k * k)) if std is None else std  # He init for ReLU
    w = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64) * std
    return (w.to(device, dtype).expand(g, -1, -1, -1, -1).clone(),
            torch.full((g, cout), bias, device=device, dtype=dtype))


def resolve_channels_last(cfg, device) -> bool:
    """``cfg.fit.channels_last`` True/False, or None: on CPU (oneDNN's layout; 1.5-1.7x faster
    convolutions measured on the demo classifier and the U-Net), off elsewhere."""
    if cfg.fit.channels_last is not None:
        return bool(cfg.fit.channels_last)
    return torch.device(device if device is not None else "cpu").type == "cpu"


def auto_scale(size) -> int:
    """``unet_scale`` 0 ("auto"): the smallest of 1, 2, 4 that predicts on a grid of at most 64 px
    per side (64²: full resolution, 128²: half)."""
    if size is None:
        raise ValueError("unet_scale 0 (auto) needs the image size")
    side = min(size)
    return next((s for s in (1, 2) if side <= 64 * s), 4)


class StackedUNet:
    """G U-Nets with DoubleConv blocks (conv3x3-ReLU twice), MaxPool down, ConvTranspose up and
    skip connections; a 1x1 head gives one channel of mask logits.

    Args:
        groups: G, the number of images (one network each).
        in_chans: image channels.
        widths: channels per level, e.g. (16, 32, 64) light or (32, 64, 128, 256, 512) reference.
        scale: run at 1/scale resolution (average-pooled input, bilinear-upsampled logits).
        init_bias: initial logit of the head (2 starts from a mask of ~0.88 everywhere).
        logit_bound: when > 0, logits are B * tanh(l / B) (Adam otherwise drives them to +-1e3).
        standardise: when > 0, logits are ``standardise * z + offset``: z the network's output
            standardised per image, offset one learned scalar per image (init ``init_bias``). Adam
            on a ReLU U-Net otherwise spends its steps shifting the whole map up or down.
        upsample: "transpose" (ConvTranspose2d, as the paper) or "bilinear" (x2 then a 1x1 conv).
        batching: how the G networks run: "grouped" (one grouped convolution per layer), "loop"
            (one ordinary convolution per network) or "vmap" (torch.func.vmap over the group axis).
        std_floor: standardise by ``std + std_floor`` (a still-flat map stays flat).
        channels_last: run the convolutions in channels-last layout (oneDNN's own: 1.5x on CPU).
        seed: every group gets the same initial weights from this seed, so a batched fit
            matches fitting each image alone.

    The settings have no defaults here: :class:`MedCAMConfig` holds them (``from_config``).
    """

    def __init__(self, groups, in_chans, *, widths, scale, init_bias, logit_bound, standardise, batching,
                 upsample, std_floor, channels_last=False, seed=0, device=None, dtype=torch.float32):
        if len(widths) < 1:
            raise ValueError("unet widths must name at least one level")
        self.groups, self.in_chans, self.widths, self.scale = groups, in_chans, tuple(widths), scale
        self.logit_bound = float(logit_bound)
        self.standardise = float(standardise)
        if batching not in ("grouped", "loop", "vmap"):
            raise ValueError(f"batching must be 'grouped', 'loop' or 'vmap', got {batching!r}")
        self.batching = batching
        if upsample not in ("transpose", "bilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        self.upsample = upsample
        self.std_floor = float(std_floor)
        self.channels_last = bool(channels_last)
        gen = torch.Generator().manual_seed(int(seed))
        p: dict[str, torch.Tensor] = {}
        cin = in_chans
        for i, w in enumerate(widths):
            p[f"enc{i}.w1"], p[f"enc{i}.b1"] = _conv_params(gen, groups, cin, w, 3, device, dtype)
            p[f"enc{i}.w2"], p[f"enc{i}.b2"] = _conv_params(gen, groups, w, w, 3, device, dtype)
            cin = w
        for i in reversed(range(len(widths) - 1)):
            w_up, w = widths[i + 1], widths[i]
            if upsample == "transpose":  # ConvTranspose2d(2, stride 2); weight layout [cin, cout, k, k]
                wt = torch.randn(w_up, w, 2, 2, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / (w_up * 4))
                p[f"up{i}.w"] = wt.to(device, dtype).expand(groups, -1, -1, -1, -1).clone()
                p[f"up{i}.b"] = torch.zeros(groups, w, device=device, dtype=dtype)
            else:  # bilinear x2, then a 1x1 conv: no checkerboard pattern
                p[f"up{i}.w"], p[f"up{i}.b"] = _conv_params(gen, groups, w_up, w, 1, device, dtype)
            p[f"dec{i}.w1"], p[f"dec{i}.b1"] = _conv_params(gen, groups, 2 * w, w, 3, device, dtype)
            p[f"dec{i}.w2"], p[f"dec{i}.b2"] = _conv_params(gen, groups, w, w, 3, device, dtype)
        p["head.w"], p["head.b"] = _conv_params(gen, groups, widths[0], 1, 1, device, dtype, std=0.01, bias=init_bias)
        if self.standardise > 0:
            # "where" (the standardised map) and "how much" (one offset per image) learn separately
            p["offset"] = torch.full((groups, 1), float(init_bias), device=device, dtype=dtype)
        # one [G, P] buffer holds every parameter (``params`` are views of it): one gradient tensor,
        # kept allocated, and an optimizer step of a few elementwise ops over all of it
        self.layout, start = [], 0
        for k, v in p.items():
            self.layout.append((k, start, start + v[0].numel(), tuple(v.shape[1:])))
            start += v[0].numel()
        self.flat = torch.cat([v.reshape(groups, -1) for v in p.values()], 1)

    @classmethod
    def from_config(cls, cfg, groups: int, in_chans: int, seed: int = 0, device=None,
                    dtype=torch.float32, size: tuple[int, int] | None = None) -> "StackedUNet":
        """The U-Net stack that ``cfg`` (a :class:`MedCAMConfig`) describes, for images of ``size``
        (needed when ``cfg.fit.unet_scale`` is 0, "auto")."""
        scale = cfg.fit.unet_scale or auto_scale(size)
        return cls(groups, in_chans, widths=cfg.fit.unet_widths, scale=scale, init_bias=cfg.fit.init_bias,
                   logit_bound=cfg.fit.logit_bound, standardise=cfg.fit.standardise, batching=cfg.fit.unet_batching,
                   upsample=cfg.fit.unet_upsample, std_floor=cfg.fit.std_floor,
                   channels_last=resolve_channels_last(cfg, device), seed=seed, device=device, dtype=dtype)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (inputs are padded to it)."""
        return self.scale * 2 ** (len(self.widths) - 1)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """``{name: [G, ...]}`` views of :attr:`flat` (gradients flow into ``flat``)."""
        return self.views(self.flat)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        g = flat.shape[0]
        return {k: flat[:, a:b].view(g, *shape) for k, a, b, shape in self.layout}

    def parameters(self) -> list[torch.Tensor]:
        """``[flat]``: the one ``[G, P]`` leaf that holds every parameter."""
        return [self.flat]

    def lr_scales(self, offset_scale: float) -> torch.Tensor:
        """Per-column learning-rate factors ``[P]``: the per-image offset is one scalar that must
        travel several logits within the fit, the network weights move together."""
        scale = torch.ones(self.flat.shape[1], device=self.flat.device, dtype=self.flat.dtype)
        for k, a, b, _ in self.layout:
            if k == "offset":
                scale[a:b] = offset_scale
        return scale

    def zero_head(self) -> "StackedUNet":
        """Head weights, bias and offset to 0: the logits start at exactly 0 (a warm start adds them
        to given logits); the head's gradient is not 0, so the network still learns."""
        with torch.no_grad():
            for k, a, b, _ in self.layout:
                if k in ("head.w", "head.b", "offset"):
                    self.flat[:, a:b] = 0
        return self

    def requires_grad_(self, flag=True) -> "StackedUNet":
        self.flat.requires_grad_(flag)
        return self

    def select(self, keep: torch.Tensor) -> "StackedUNet":
        """A view of the groups in ``keep`` (indices), sharing nothing with this one."""
        new = object.__new__(StackedUNet)
        new.__dict__.update(self.__dict__)
        new.groups = int(keep.numel())
        new.flat = self.flat.detach()[keep].clone().requires_grad_(self.flat.requires_grad)
        return new

    # --- grouped layers: activations are [1, G*C, H, W], group g's channels contiguous; ``p`` holds
    # the parameters of the g networks run together (all of them, one slice, or a vmap slice)
    def _conv(self, p, h, name, suffix="", padding=1):
        w, b = p[f"{name}.w{suffix}"], p[f"{name}.b{suffix}"]
        g, cout = w.shape[0], w.shape[1]
        w = w.reshape(g * cout, *w.shape[2:])
        if self.channels_last and self.batching != "vmap":
            w = w.contiguous(memory_format=torch.channels_last)   # the layout of the activations
        return F.conv2d(h, w, b.reshape(-1), padding=padding, groups=g)

    def _double(self, p, h, name):
        return F.relu(self._conv(p, F.relu(self._conv(p, h, name, "1")), name, "2"))

    def _up(self, p, h, i):
        if self.upsample == "bilinear":
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            return self._conv(p, h, f"up{i}", padding=0)
        w, b = p[f"up{i}.w"], p[f"up{i}.b"]
        g = w.shape[0]
        return F.conv_transpose2d(h, w.reshape(g * w.shape[1], *w.shape[2:]), b.reshape(-1), stride=2, groups=g)

    @staticmethod
    def _cat(a, b, g):
        a = a.view(1, g, -1, *a.shape[2:])
        b = b.view(1, g, -1, *b.shape[2:])
        return torch.cat([a, b], dim=2).reshape(1, -1, *a.shape[3:])

    def _body(self, p, z):
        """``z`` ``[g,C,h,w]`` (padded, scaled) -> raw logits ``[g,1,h,w]`` with parameters ``p``."""
        g = z.shape[0]
        z = z.reshape(1, -1, *z.shape[2:])
        if self.channels_last and self.batching != "vmap":
            z = z.contiguous(memory_format=torch.channels_last)
        skips = []
        for i in range(len(self.widths)):
            if i > 0:
                z = F.max_pool2d(z, 2)
            z = self._double(p, z, f"enc{i}")
            skips.append(z)
        for i in reversed(range(len(self.widths) - 1)):
            z = self._double(p, self._cat(skips[i], self._up(p, z, i), g), f"dec{i}")
        return self._conv(p, z, "head", padding=0).view(g, 1, *z.shape[2:])

    def _run(self, params, z):
        if self.batching == "grouped" or self.groups == 1:
            return self._body(params, z)
        if self.batching == "loop":
            return torch.cat([self._body({k: v[i:i + 1] for k, v in params.items()}, z[i:i + 1])
                              for i in range(self.groups)])
        # vmap over the group axis of every parameter and of the input
        single = lambda p, zi: self._body({k: v[None] for k, v in p.items()}, zi[None])[0]  # noqa: E731
        return torch.func.vmap(single)(params, z)

    def __call__(self, x: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``[G,1,H,W]`` for images ``x`` ``[G,C,H,W]`` (group g explains x[g]), with
        the parameters ``flat`` ``[G, P]`` (default :attr:`flat`)."""
        params = self.views(self.flat if flat is None else flat)
        g, c, h, w = x.shape
        if g != self.groups or c != self.in_chans:
            raise ValueError(f"U-Net stack of {self.groups}x{self.in_chans} channels got input {tuple(x.shape)}")
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        z = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        if self.scale > 1:
            z = F.avg_pool2d(z, self.scale)
        logits = self._run(params, z)
        if self.scale > 1:
            logits = F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)
        logits = logits[:, :, :h, :w]
        if self.standardise > 0:
            flat = logits.flatten(1)
            # a std floor keeps a still-flat map flat instead of blowing its noise up to unit size
            z = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + self.std_floor)
            logits = (self.standardise * z + params["offset"]).view_as(logits)
        if self.logit_bound > 0:  # B * tanh(l / B): no runaway logits, ranking kept
            logits = self.logit_bound * torch.tanh(logits / self.logit_bound)
        return logits


def adam_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8, active: torch.Tensor | None = None) -> None:
    """One Adam step, in place, of ``p`` ``[G,P]`` with moments ``m``, ``v`` ``[G,P]``.

    ``t`` is the step count (a 0-dim tensor, this step included) and ``lr`` the per-column
    learning rate ``[P]``: no Python number changes between steps, so a compiled or captured step
    is reused. Rows where ``active`` ``[G]`` is False are left unchanged (finished images).
    """
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    c1 = 1 - torch.pow(b1, t)
    c2 = 1 - torch.pow(b2, t)
    step = (m / ((v / c2).sqrt() + eps)) * (lr / c1)
    if active is not None:
        step = step * active[:, None].to(step.dtype)
    p.sub_(step)


class StackedAdam:
    """Adam over the ``[G,P]`` parameter buffer of a :class:`StackedUNet`; its state is sliced with
    the groups (``select``). The gradient stays allocated (zeroed after each step)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps=1e-8, lr_scale=None):
        if len(params) != 1 or params[0].dim() != 2:
            raise ValueError("StackedAdam takes the one [G, P] buffer of a StackedUNet (unet.parameters())")
        (p,) = params
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.lr_scale = lr_scale if lr_scale is not None else torch.ones(p.shape[1], device=p.device, dtype=p.dtype)
        self.lr_col = self.lr_scale * lr
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.t = torch.zeros((), device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None):
        """Applies ``p.grad`` (then zeroes it); ``active`` ``[G]`` bool masks finished groups out."""
        (p,) = self.params
        if p.grad is None:
            return
        self.t += 1
        adam_update(p, p.grad, self.m, self.v, self.t, self.lr_col, self.betas, self.eps, active)
        p.grad.zero_()

    def select(self, params: list[torch.Tensor], keep: torch.Tensor) -> "StackedAdam":
        new = StackedAdam(params, self.lr, self.betas, self.eps, self.lr_scale)
        new.m, new.v, new.t = self.m[keep].clone(), self.v[keep].clone(), self.t.clone()
        return new

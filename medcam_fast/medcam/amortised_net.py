"""The amortised explainer network: one class-conditional U-Net for a whole data set."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """conv3x3-ReLU twice, then FiLM by the target class: h * (1 + gamma_c) + beta_c."""

    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Embedding(num_classes, 2 * cout)
        nn.init.zeros_(self.film.weight)   # starts unconditioned; the class is learned in

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(h))))
        gamma, beta = self.film(target)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ConditionalUNet(nn.Module):
    """Mask logits ``[N,1,H,W]`` for images ``[N,C,H,W]`` and target classes ``[N]``.

    A U-Net (``widths`` channels per level, max-pool down, bilinear x2 + 1x1 conv up, skips) run at
    1/``scale`` of the input (average-pooled in, bilinear logits out), with every block modulated
    by the target class (FiLM, Perez et al. 2018): the same image gives other masks for other
    classes, so a mask can be asked for a class the classifier does not predict.

    As the per-image U-Net (:class:`~medcam_fast.medcam.unet.StackedUNet`), the logits are
    ``standardise * z + offset``: z the map standardised per image ("where"), the offset one
    scalar ("how much"), here one per class (a read-out of the features ran away in training:
    scaling the features up was the cheapest way to shrink every mask).

    Args:
        in_chans: image channels; num_classes: K of the classifier.
        widths: channels per level; scale: 1, 2 or 4; init_bias: the initial offset
            (negative: start from (almost) nothing, as the per-image fit).
        standardise, std_floor: as in :class:`MedCAMConfig` (0: raw logits).
    """

    def __init__(self, in_chans: int, num_classes: int, widths=(16, 32, 64, 128), scale: int = 2,
                 init_bias: float = -2.0, standardise: float = 3.0, std_floor: float = 1.0):
        super().__init__()
        if len(widths) < 1 or scale not in (1, 2, 4) or num_classes < 2 or in_chans < 1:
            raise ValueError(f"ConditionalUNet needs widths, scale in (1, 2, 4), K >= 2 and C >= 1; got "
                             f"widths={widths}, scale={scale}, num_classes={num_classes}, in_chans={in_chans}")
        self.in_chans, self.num_classes, self.widths, self.scale = in_chans, num_classes, tuple(widths), scale
        self.init_bias, self.standardise, self.std_floor = float(init_bias), float(standardise), float(std_floor)
        self.enc = nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.enc.append(_Block(cin, w, num_classes))
            cin = w
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(len(widths) - 1))
        self.dec = nn.ModuleList(_Block(2 * widths[i], widths[i], num_classes) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)   # the offset carries init_bias
        self.offset = nn.Embedding(num_classes, 1)
        nn.init.constant_(self.offset.weight, init_bias)

    def offset_parameters(self) -> list[nn.Parameter]:
        """The parameters of the offset (trained with a larger learning rate, as the fit's)."""
        return list(self.offset.parameters())

    def spec(self) -> dict:
        """The constructor's arguments (what a card stores to rebuild the network)."""
        return {"in_chans": self.in_chans, "num_classes": self.num_classes, "widths": list(self.widths),
                "scale": self.scale, "init_bias": self.init_bias, "standardise": self.standardise,
                "std_floor": self.std_floor}

    @property
    def multiple(self) -> int:
        return self.scale * 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.in_chans or target.shape != (n,):
            raise ValueError(f"ConditionalUNet({self.in_chans} channels) got x {tuple(x.shape)} and target "
                             f"{tuple(target.shape)}; target must be [N] class indices")
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        z = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        if self.scale > 1:
            z = F.avg_pool2d(z, self.scale)
        skips = []
        for i, block in enumerate(self.enc):
            if i > 0:
                z = F.max_pool2d(z, 2)
            z = block(z, target)
            skips.append(z)
        for i in reversed(range(len(self.widths) - 1)):
            up = self.up[i](F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False))
            z = self.dec[i](torch.cat([skips[i], up], 1), target)
        logits = self.head(z)
        if self.scale > 1:
            logits = F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)
        logits = logits[:, :, :h, :w]
        offset = self.offset(target)    # [N,1]
        if self.standardise > 0:
            flat = logits.flatten(1)
            z = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + self.std_floor)
            return (self.standardise * z + offset).view_as(logits)
        return logits + offset[:, :, None, None]

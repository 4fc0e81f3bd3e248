"""Preprocessing that follows a model's timm data config: size, mean and std, grayscale or RGB."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import _to_unit, read_image


@dataclass(frozen=True)
class Preprocess:
    """Turns a path, PIL image or array into the tensor the model expects.

    Calling it returns ``Tensor[C,H,W]`` (float32): the image resized to ``input_size``
    (bilinear, antialiased), scaled to [0, 1] and normalised with ``mean``/``std``.
    ``C = len(mean)``: RGB input is averaged to gray for 1-channel models, gray is repeated for
    3-channel ones.
    """

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocess":
        """From timm's ``resolve_data_config`` for the model (its pretrained_cfg)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return cls(tuple(cfg["input_size"][1:]), tuple(cfg["mean"]), tuple(cfg["std"]))

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def to_unit(self, image) -> torch.Tensor:
        """``[C,H,W]`` in [0, 1] at the model's size and channel count, before normalisation."""
        if isinstance(image, (str, Path)):
            a = read_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                a = image.astype(np.float32) / 255.0
            elif np.issubdtype(image.dtype, np.integer):   # e.g. uint16: min-max, as read_image does
                a = _to_unit(image)
            else:                                          # float (and bool) arrays are taken as [0, 1]
                a = image.astype(np.float32)
        elif hasattr(image, "convert"):  # PIL.Image
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16/32-bit: min-max, as read_image does
                a = _to_unit(np.asarray(image))
            else:   # every 8-bit mode (L, LA, 1, P, RGB, RGBA, CMYK, YCbCr, ...) as 8-bit L or RGB
                a = np.asarray(image.convert("L" if image.mode in ("L", "LA", "1") else "RGB"),
                               dtype=np.float32) / 255.0
        else:
            raise ValueError(f"cannot preprocess {type(image).__name__}: give a path, PIL image or numpy array")
        if a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
            raise ValueError(f"expected an [H,W] or [H,W,3] image, got shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        if self.in_chans == 1 and t.shape[0] == 3:
            t = t.mean(0, keepdim=True)
        elif self.in_chans == 3 and t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        t = F.interpolate(t[None], size=self.input_size, mode="bilinear", antialias=True, align_corners=False)[0]
        return t.clamp_(0, 1)

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        """``[...,C,H,W]`` in [0,1] → normalised."""
        mean = torch.tensor(self.mean, dtype=unit.dtype, device=unit.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=unit.dtype, device=unit.device).view(-1, 1, 1)
        return (unit - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalise` (for display)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    def __call__(self, image) -> torch.Tensor:
        return self.normalise(self.to_unit(image))

"""Reading single image files: PNG/JPEG, DICOM (with windowing) and NIfTI (one 2-D slice).

Every reader returns a float32 array in [0, 1], ``[H,W]`` (grayscale) or ``[H,W,3]`` (RGB), and
raises :class:`ImageReadError` naming the file when it cannot.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}


class ImageReadError(ValueError):
    """A file that could not be read as an image; the message names the file and the cause."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _to_unit(a: np.ndarray) -> np.ndarray:
    """Min-max scales to [0, 1]; a constant image becomes zeros."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("image holds NaN or Inf")
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def read_raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                return _to_unit(np.asarray(im))
            im = im.convert("L") if im.mode in ("L", "LA", "P", "1") and _is_gray(im) else im.convert("RGB")
            return np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(path, f"not a readable image ({exc})") from exc


def _is_gray(im) -> bool:
    if im.mode != "P":
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_dicom(path: Path) -> np.ndarray:
    """Pixel data with the modality rescale and the file's VOI window (WindowCenter/Width) applied."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImageReadError(path, "DICOM needs pydicom: pip install pydicom") from exc
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"not a readable DICOM file ({exc})") from exc
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame file: the middle frame
    if getattr(ds, "SamplesPerPixel", 1) == 3:
        return _to_unit(pixels)
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        # scale by the window's own output range (what values far below / above it map to), not by the
        # image's min and max: a min-max stretch would undo the window for images that do not fill it
        lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds))
        if hi <= lo or not np.isfinite([lo, hi]).all():
            raise ValueError(f"degenerate VOI window (output range {lo}..{hi})")
        values = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    else:
        values = _to_unit(np.asarray(values))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = 1.0 - values
    return values


def read_nifti(path: Path, slice_index: int | None = None, axis: int = 2) -> np.ndarray:
    """One 2-D slice of a NIfTI volume along ``axis`` (default: the middle slice)."""
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImageReadError(path, "NIfTI needs nibabel: pip install nibabel") from exc
    try:
        volume = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as exc:
        raise ImageReadError(path, f"not a readable NIfTI file ({exc})") from exc
    if volume.ndim == 2:
        return _to_unit(volume)
    volume = volume.reshape(volume.shape[:3]) if volume.ndim > 3 and all(s == 1 for s in volume.shape[3:]) else volume
    if volume.ndim != 3:
        raise ImageReadError(path, f"expected a 2-D or 3-D volume, got shape {volume.shape}")
    n = volume.shape[axis]
    index = n // 2 if slice_index is None else slice_index
    if not 0 <= index < n:
        raise ImageReadError(path, f"slice {index} is outside 0..{n - 1} along axis {axis}")
    return _to_unit(np.take(volume, index, axis=axis))


def read_image(path, slice_index: int | None = None) -> np.ndarray:
    """Reads PNG/JPEG/BMP/TIFF, DICOM or NIfTI by suffix.

    Returns:
        float32 ``[H,W]`` or ``[H,W,3]`` in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    suffix = _suffix(path)
    try:
        if suffix in DICOM_SUFFIXES:
            return read_dicom(path)
        if suffix in NIFTI_SUFFIXES:
            return read_nifti(path, slice_index)
        if suffix in RASTER_SUFFIXES:
            return read_raster(path)
    except ValueError as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(path, str(exc)) from exc
    raise ImageReadError(path, f"unknown image type {suffix!r} (PNG, JPEG, BMP, TIFF, DICOM .dcm, NIfTI .nii/.nii.gz)")


def read_mask(path) -> np.ndarray:
    """A lesion mask file as a bool ``[H,W]`` array (nonzero is lesion)."""
    a = read_image(path)
    return (a.max(axis=-1) if a.ndim == 3 else a) > 0.5

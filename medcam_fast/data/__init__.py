"""Data loading: single files (PNG/JPEG/DICOM/NIfTI), labelled collections, preprocessing, and
the bundled demo samples."""
from __future__ import annotations

import json
from pathlib import Path

from .datasets import Sample, brain_mri, csv_dataset, folder_dataset, isic2018
from .io import ImageReadError, read_image, read_mask
from .preprocess import Preprocess

SAMPLES_DIR = Path(__file__).with_name("samples")

__all__ = ["ImageReadError", "Preprocess", "Sample", "brain_mri", "csv_dataset", "folder_dataset", "isic2018",
           "read_image", "read_mask", "samples"]


def samples() -> list[Sample]:
    """The bundled demo samples: brain MRI test-split slices with tumour masks (CC BY 4.0; see
    ``samples/ATTRIBUTION``). Each :class:`Sample` has ``.path``, ``.mask_path``, ``.label`` (int)
    and ``.name``."""
    index = json.loads((SAMPLES_DIR / "samples.json").read_text())
    return [Sample(SAMPLES_DIR / e["image"], SAMPLES_DIR / e["mask"], int(e["label"]), e["name"], e.get("split"),
                   e.get("class_name")) for e in index]

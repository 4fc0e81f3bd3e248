"""Labelled image collections: a folder of class subfolders, and the CSV formats of the shared
data (brain_mri ``split.csv``, isic2018 ``labels.csv``)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .io import RASTER_SUFFIXES, DICOM_SUFFIXES, NIFTI_SUFFIXES, _suffix

IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES


@dataclass(frozen=True)
class Sample:
    """One image: its file, its lesion mask file (or None), its class index and a short name."""

    path: Path
    mask_path: Path | None
    label: int
    name: str
    split: str | None = None
    class_name: str | None = None


def folder_dataset(root, class_names: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """``root/<class>/<image>``: returns the samples and the class names (sorted unless given)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    class_names = list(class_names) if class_names else found
    missing = set(class_names) - set(found)
    if missing:
        raise ValueError(f"{str(root)!r} has no subfolder for classes {sorted(missing)}")
    samples = []
    for label, cls in enumerate(class_names):
        for p in sorted((root / cls).iterdir()):
            if p.is_file() and _suffix(p) in IMAGE_SUFFIXES:
                samples.append(Sample(p, None, label, f"{cls}/{p.stem}", None, cls))
    if not samples:
        raise ValueError(f"no images under {str(root)!r}")
    return samples, class_names


BRAIN_CLASSES = ["glioma", "meningioma", "pituitary"]
ISIC_CLASSES = ["NV", "MEL"]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"no CSV at {str(path)!r}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brain_mri(root, split: str | None = None) -> tuple[list[Sample], list[str]]:
    """The brain_mri set from ``split.csv`` (``id,label,split,image,mask``), optionally one split."""
    root = Path(root)
    rows = _read_csv(root / "split.csv")
    samples = [Sample(root / r["image"], root / r["mask"] if r.get("mask") else None,
                      BRAIN_CLASSES.index(r["label"]), f"brain_{r['id']}", r["split"], r["label"])
               for r in rows if split is None or r["split"] == split]
    return samples, list(BRAIN_CLASSES)


def isic2018(root, split: str | None = None, classes=ISIC_CLASSES) -> tuple[list[Sample], list[str]]:
    """The isic2018 rows of ``labels.csv`` whose diagnosis is one of ``classes`` (default NV vs MEL)."""
    root = Path(root)
    rows = _read_csv(root / "labels.csv")
    samples = [Sample(root / r["image"], root / r["mask"] if r.get("mask") else None,
                      list(classes).index(r["diagnosis"]), r["id"], r["split"], r["diagnosis"])
               for r in rows if r["diagnosis"] in classes and (split is None or r["split"] == split)]
    return samples, list(classes)


def csv_dataset(csv_path, split: str | None = None) -> tuple[list[Sample], list[str]]:
    """Either shared-data CSV format, told apart by its header."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f), [])
    if "diagnosis" in header:
        return isic2018(csv_path.parent, split)
    if {"id", "label", "split", "image"} <= set(header):
        return brain_mri(csv_path.parent, split)
    raise ValueError(f"{str(csv_path)!r}: unknown CSV header {header}; expected split.csv or labels.csv columns")

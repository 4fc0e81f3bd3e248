"""Expanding command-line inputs (files, class folders, shared-data CSVs) into samples."""
from __future__ import annotations

from pathlib import Path

from .datasets import IMAGE_SUFFIXES, Sample, csv_dataset, folder_dataset
from .io import _suffix


def collect_inputs(paths, mask_dir=None, split: str | None = None):
    """Expands ``--input`` paths into :class:`~medcam_fast.data.Sample` s.

    A folder of class subfolders goes through ``data.folder_dataset``; a folder of images without
    subfolders gives its images; ``split.csv`` / ``labels.csv`` go through ``data.csv_dataset`` (one
    ``split`` if given); any other path is one image (read later, so a missing or corrupt file becomes a
    named failure rather than a stop). Ground-truth masks: the CSV's, else ``<mask_dir>/<stem>.<ext>``.

    Returns ``(samples, failures)``, failures as ``{"path", "error"}`` dicts (a folder without images,
    an unreadable CSV).
    """
    samples, failures = [], []
    for p in map(Path, paths):
        try:
            if p.is_dir():
                if any(d.is_dir() for d in p.iterdir()):
                    samples += folder_dataset(p)[0]
                else:
                    files = sorted(f for f in p.iterdir() if f.is_file() and _suffix(f) in IMAGE_SUFFIXES)
                    if not files:
                        raise ValueError(f"no images (PNG, JPEG, DICOM, NIfTI) in folder {str(p)!r}")
                    samples += [Sample(f, None, -1, f.name, None, None) for f in files]
            elif p.suffix.lower() == ".csv":
                found = csv_dataset(p, split)[0]
                if not found:
                    raise ValueError(f"no rows in {str(p)!r}" + (f" for split {split!r}" if split else ""))
                samples += found
            else:
                samples.append(Sample(p, None, -1, p.name, None, None))
        except (ValueError, OSError, KeyError) as exc:
            failures.append({"path": str(p), "error": f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError)
                             else str(exc)})
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            raise ValueError(f"--mask-dir {str(mask_dir)!r} is not a folder")
        by_stem = {}
        for f in sorted(mask_dir.iterdir()):
            if f.is_file() and _suffix(f) in IMAGE_SUFFIXES:
                by_stem.setdefault(f.name[: -len(_suffix(f))], f)
        samples = [s if s.mask_path is not None else
                   Sample(s.path, by_stem.get(s.path.name[: -len(_suffix(s.path))] if _suffix(s.path) else s.path.name),
                          s.label, s.name, s.split, s.class_name) for s in samples]
    return samples, failures

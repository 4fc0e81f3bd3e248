"""The one worker class behind Serve replicas and Data actors, and the compact row it returns."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# what a row keeps of Explanation.rows(): scalars only (masks go as packed bits)
ROW_FIELDS = {"label": int, "class_name": str, "status": str, "necessary_status": str, "area": float,
              "necessary_area": float, "a_star": float, "necessary_a_star": float, "prob_input": float,
              "prob_null": float, "null_keeps_label": bool, "sufficient": bool, "necessary_flipped": bool,
              "random_pass": float, "necessary_random_pass": float, "steps": int, "seconds": float}


def pack_mask(mask) -> bytes:
    """bool ``[H,W]`` -> bytes, one bit per pixel (``H*W/8`` bytes)."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1)).tobytes()


def unpack_mask(data: bytes | None, height: int, width: int) -> np.ndarray | None:
    """The bool ``[H,W]`` mask :func:`pack_mask` packed (None stays None)."""
    if data is None:
        return None
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=height * width).astype(bool).reshape(height, width)


@dataclass(frozen=True)
class ModelSpec:
    """A classifier as the CLI's ``--model`` names it (``demo``, ``timm:<arch>:<weights>``, a
    TorchScript or torch.export file; :mod:`medcam_fast.models.loading`), loaded inside each worker.
    ``device``: ``auto`` (a GPU when the worker was given one), ``cpu`` or ``cuda[:N]``."""

    spec: str
    size: tuple | None = None
    mean: tuple | None = None
    std: tuple | None = None
    classes: str | None = None
    device: str = "auto"

    @classmethod
    def of(cls, model) -> "ModelSpec":
        """``model`` as a ModelSpec (a spec string is wrapped); ValueError for anything else."""
        spec = cls(model) if isinstance(model, str) else model
        if not isinstance(spec, cls):
            raise ValueError(f"model must be a ModelSpec or a spec string, got {type(model).__name__}")
        return spec

    def load(self, device="cpu"):
        """The :class:`~medcam_fast.models.loading.LoadedModel` this spec names, on ``device``."""
        from ..models.loading import InputOptions, load_model

        opts = InputOptions(self.size, list(self.mean) if self.mean else None, list(self.std) if self.std else None,
                            self.classes)
        return load_model(self.spec, opts, device)


@dataclass
class ExplainResult:
    """One image's explanation as it crosses a process boundary: the scalar fields of
    ``Explanation.rows()`` (``row``), and both sides' masks, bool ``[H,W]`` (None: that side is off).

    ``batch``: the ids explained in the same call. An explanation is deterministic given the seed,
    its batch and the torch threads (they set the float rounding of the fit's reductions); in
    another batch or with other threads a mask can differ where rankings tie within that rounding."""

    id: str
    row: dict = field(default_factory=dict)
    mask: np.ndarray | None = None
    necessary_mask: np.ndarray | None = None
    error: str | None = None
    batch: list | None = None       # the ids of the Explainer call it came from, in order


    def record(self) -> dict:
        """The flat Parquet row: id, the scalar fields, height/width, the packed masks, error."""
        h, w = (None, None) if self.mask is None else self.mask.shape
        out = {"id": self.id, **{k: self.row.get(k) for k in ROW_FIELDS}, "height": h, "width": w,
               "mask": None if self.mask is None else pack_mask(self.mask),
               "necessary_mask": None if self.necessary_mask is None else pack_mask(self.necessary_mask),
               "error": self.error}
        return out

    @classmethod
    def from_record(cls, rec: dict) -> "ExplainResult":
        h, w = rec.get("height"), rec.get("width")
        mask = None if h is None else unpack_mask(rec.get("mask"), int(h), int(w))
        nec = None if h is None else unpack_mask(rec.get("necessary_mask"), int(h), int(w))
        return cls(str(rec["id"]), {k: rec.get(k) for k in ROW_FIELDS}, mask, nec, rec.get("error"))


def _assigned_cpus() -> int | None:
    """The CPUs Ray gave this actor (None outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return max(1, int(cpus)) if cpus else None
    except Exception:  # noqa: BLE001 - outside a Ray worker: the process's own threads stand
        return None


class ExplainWorker:
    """Holds an :class:`~medcam_fast.Explainer` for one classifier, built in this process.

    Args:
        model: a :class:`ModelSpec` (or its spec string).
        config: a :class:`~medcam_fast.MedCAMConfig` (default: the package default).
        threads: torch threads (default: the CPUs Ray assigned this actor, else torch's own).
        seed: the explainer's seed (same seed, same masks).

    Thread-safe for one caller at a time; Serve and Data give each actor one.
    """

    def __init__(self, model, config=None, threads: int | None = None, seed: int = 0):
        from ..medcam import Explainer, MedCAMConfig

        spec = ModelSpec.of(model)
        threads = threads or _assigned_cpus()
        if threads:
            torch.set_num_threads(int(threads))
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec, self.seed, self.device = spec, int(seed), torch.device(device)
        self.loaded = spec.load(self.device)
        cfg = config or MedCAMConfig()
        cfg = cfg.replace(fit=dict(layers=self.loaded.layers)) if self.loaded.layers else cfg
        self.explainer = Explainer(self.loaded.model, cfg, device=self.device)
        self.pid = os.getpid()

    @property
    def class_names(self) -> list:
        return list(self.loaded.class_names)

    def preprocess(self, path) -> np.ndarray:
        """float32 ``[C,H,W]``: an image file read and normalised for the classifier."""
        return self.loaded.preprocess(path).numpy().astype(np.float32)

    def explain_arrays(self, x: np.ndarray, ids: list[str], seed: int | None = None) -> list[ExplainResult]:
        """Explains ``x`` float ``[N,C,H,W]`` (preprocessed) in one batched call; one result per id.
        A failed call (not out of memory) gives every image of it an ``error``."""
        from ..medcam.verify import is_oom

        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} images")
        if len(ids) == 0:
            return []
        t0 = time.perf_counter()
        try:
            e = self.explainer(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device),
                               seed=self.seed if seed is None else int(seed))
        except (ValueError, RuntimeError) as exc:
            msg = ("out of memory: " if isinstance(exc, RuntimeError) and is_oom(exc) else "") + str(exc)
            return [ExplainResult(i, error=f"{type(exc).__name__}: {msg}") for i in ids]
        rows = e.rows(self.class_names)
        out = []
        for j, i in enumerate(ids):
            row = {k: rows[j].get(k) for k in ROW_FIELDS}
            row["seconds"] = (time.perf_counter() - t0) / len(ids)
            out.append(ExplainResult(i, row, e.mask[j].cpu().numpy(),
                                     None if not e.two_sided else e.necessary_mask[j].cpu().numpy(), batch=list(ids)))
        return out

    def explain_paths(self, paths: list, ids: list[str] | None = None, seed: int | None = None) -> list[ExplainResult]:
        """Reads and explains image files; an unreadable file is an ``error`` row, the others go on."""
        ids = [str(p) for p in paths] if ids is None else [str(i) for i in ids]
        arrays, ok, failed = [], [], {}
        for p, i in zip(paths, ids):
            try:
                arrays.append(self.preprocess(p))
                ok.append(i)
            except (ValueError, OSError) as exc:
                failed[i] = ExplainResult(i, error=f"{type(exc).__name__}: {exc}")
        done = {r.id: r for r in self.explain_arrays(np.stack(arrays), ok, seed)} if ok else {}
        return [done.get(i) or failed[i] for i in ids]

"""The evidence probe: does a classifier's behaviour on partial images mean anything?

Rankings (a method's map, random pixels, random blobs, the lesion grown or shrunk around itself)
are cut to areas, and each cut is scored four ways: kept when the rest is blank / blurred, and
flipped when the cut itself is deleted (blank / blurred). No explainer is fitted. A classifier
whose label random scattered pixels keep as often as the lesion does reacts to holes, not to
evidence. ``benchmarks/evidence_probe.py`` runs it on brain_mri.
"""
from __future__ import annotations

import numpy as np
import torch

from ..medcam.backgrounds import blur
from ..medcam.verify import batched_logits
from ..metrics.topk import top_k_mask
from .masking import blob_scores, pixel_scores

PROBE_AREAS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50, 0.70)
TESTS = ("kept_blank", "kept_blur", "flipped_deleted_blank", "flipped_deleted_blur")


def lesion_scores(lesion: torch.Tensor) -> torch.Tensor:
    """``[N,H,W]`` ranking that grows the lesion by distance: inside, depth from its border (the
    core first); outside, minus the distance to it. An empty lesion ranks nothing (all zero)."""
    from scipy.ndimage import distance_transform_edt

    out = torch.zeros(lesion.shape, dtype=torch.float32)
    for i, m in enumerate(lesion.cpu().numpy().astype(bool)):
        if m.any():
            out[i] = torch.from_numpy((distance_transform_edt(m) - distance_transform_edt(~m)).astype(np.float32))
    return out


def probe(forward, x: torch.Tensor, label: torch.Tensor, rankings: dict[str, torch.Tensor], baseline: float = 0.0,
          areas=PROBE_AREAS, batch_size: int = 64) -> dict:
    """Scores every ranking ``[N,H,W]`` of ``rankings`` cut to every area.

    Returns ``{ranking: {test: [N, len(areas)] bool}}`` for the TESTS, plus ``"null"``: ``[N]``
    bool, True where the blank image already gives ``label``. Rows of a ranking that is all
    equal for an image (an empty lesion) are NaN-free but meaningless: callers drop them
    (``valid`` ``[N]`` per ranking).
    """
    blurred = blur(x, None)
    blank = torch.full_like(x, baseline)
    null = batched_logits(forward, blank[:1], 1).argmax(1).item() == label

    def calls(evidence):
        return batched_logits(forward, evidence, batch_size).argmax(1).to(label.device) == label

    out = {"null": null.cpu()}
    for name, scores in rankings.items():
        res = {t: torch.zeros(x.shape[0], len(areas), dtype=torch.bool) for t in TESTS}
        for j, a in enumerate(areas):
            m = top_k_mask(scores, a)[:, None].to(x.dtype)
            res["kept_blank"][:, j] = calls(m * x + (1 - m) * blank).cpu()
            res["kept_blur"][:, j] = calls(m * x + (1 - m) * blurred).cpu()
            res["flipped_deleted_blank"][:, j] = ~calls((1 - m) * x + m * blank).cpu()
            res["flipped_deleted_blur"][:, j] = ~calls((1 - m) * x + m * blurred).cpu()
        res["valid"] = (scores.flatten(1).amax(1) > scores.flatten(1).amin(1)).cpu()
        out[name] = res
    return out


def exact_mask_kept(forward, x, label, mask: torch.Tensor, baseline: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """``[N]`` bool: ``mask`` ``[N,H,W]`` itself (e.g. the lesion) kept, the rest blank."""
    m = mask[:, None].to(x.dtype)
    ev = m * x + (1 - m) * baseline
    return batched_logits(forward, ev, batch_size).argmax(1).cpu() == label.cpu()


def random_rankings(n: int, size: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """The two random controls' rankings: scattered pixels and smooth blobs (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {"random pixels": pixel_scores(n, size, gen), "random blobs": blob_scores(n, size, gen)}


def rates(result: dict, group: torch.Tensor) -> dict:
    """``{ranking: {test: [len(areas)] rate}}`` over the images of ``group`` ``[N]`` bool (valid ones)."""
    out = {}
    for name, res in result.items():
        if name == "null":
            continue
        sel = group & res["valid"]
        out[name] = {t: (res[t][sel].float().mean(0).tolist() if sel.any() else [float("nan")] * res[t].shape[1])
                     for t in TESTS}
        out[name]["n"] = int(sel.sum())
    return out

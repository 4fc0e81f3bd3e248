"""Metrics for explanations: decision keeping, deletion/insertion, ROAD, localisation, sanity checks.

All metrics are batched over a leading N and stay on the input's device. Classifiers are passed
as ``forward``: any callable mapping ``[B,C,H,W]`` images to ``[B,K]`` logits (run under
``torch.no_grad()``); functions that call it many times chunk by ``batch_size``.
"""
from .curves import CurveResult, deletion, gaussian_blur, insertion
from .decision import confidence_change, connected_components, decision_kept, kept_rate, mask_area
from .localisation import (binarise, dice, hit_rate, iou, normalise, pointing_game, precision_at_gt_area,
                           tune_threshold)
from .road import ROADResult, noisy_linear_impute, road, road_masks
from .sanity import cascading_randomisation, default_stages, spearman
from .topk import pixel_count, top_k_mask

__all__ = [
    "CurveResult", "ROADResult",
    "binarise", "cascading_randomisation", "confidence_change", "connected_components", "decision_kept",
    "default_stages", "deletion", "dice", "gaussian_blur", "hit_rate", "insertion", "iou", "kept_rate",
    "mask_area", "noisy_linear_impute", "normalise", "pixel_count", "pointing_game", "precision_at_gt_area", "road", "road_masks",
    "spearman", "top_k_mask", "tune_threshold",
]

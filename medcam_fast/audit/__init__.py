"""Shortcut audit of a whole data set of explanations (SpRAy, Lapuschkin et al. 2019).

    from medcam_fast.audit import audit, write_audit_html
    result = audit(maps, labels, class_names, lesions=lesions)   # maps [N,H,W] >= 0, labels [N]
    for cluster in result.flagged():
        print(result.class_names[cluster.class_index], len(cluster.members), cluster.reason)
    write_audit_html("out/audit.html", result, images=thumbnails, ids=names)

The analysis is numpy and Pillow only (no scipy, no scikit-learn); :func:`audit_dataset` (``run.py``)
explains the images first, in this process or on Ray (:mod:`medcam_fast.distributed`).
"""
from .analysis import (CONCENTRATED, LESION_GAP, OFF_WEIGHT, PLACE_LIFT, TOP_SHARE, AuditResult, Cluster, audit,
                       in_lesion_share, spectral_clusters)
from .html import write_audit_html
from .run import audit_dataset, evidence_maps

__all__ = ["AuditResult", "CONCENTRATED", "Cluster", "LESION_GAP", "OFF_WEIGHT", "PLACE_LIFT", "TOP_SHARE", "audit", "audit_dataset", "evidence_maps",
           "in_lesion_share", "spectral_clusters", "write_audit_html"]

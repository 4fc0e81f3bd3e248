"""Shortcut audit of a whole archive of evidence maps: spectral relevance analysis (SpRAy).

After Lapuschkin et al. 2019, "Unmasking Clever Hans predictors": the evidence maps of each class
are clustered spectrally and a cluster whose evidence lies off the lesion (where lesion masks exist)
or piles up in one place no other image uses (where they do not) is flagged as a likely shortcut.
Nothing is told about the shortcut. numpy only (``numpy.linalg.eigh``).

Flag rule (constants below), always with at least ``min_cluster`` members:

* some member has a lesion: the members' mean in-lesion share is < ``1 - off_lesion`` and either at
  least ``LESION_GAP`` below the mean of the class's other images with a lesion (where none has one:
  of all other images with a lesion; where no image at all: the first condition alone), or
  its evidence sits in rings of distance from the image centre (:func:`radial_profile`) where the
  images outside the cluster put ``RING_LIFT`` times less (marks at the border, in any direction);
* no member has a lesion: ``concentration >= CONCENTRATED`` and the images outside the cluster (its
  class's other images and the other classes) put less than ``PLACE_LIFT`` times an even share of
  their mean evidence into the cluster's core (the fewest pixels holding half its mean evidence).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AuditResult", "Cluster", "audit", "in_lesion_share", "radial_profile", "spectral_clusters",
           "CONCENTRATED", "LESION_GAP", "OFF_WEIGHT", "PLACE_LIFT", "TOP_SHARE"]

TOP_SHARE = 0.05     # concentration = mass share in the top 5% pixels of a mean map
CONCENTRATED = 0.5   # "one small place": half of the cluster's mean evidence in 5% of the image
PLACE_LIFT = 0.5     # "a place others do not use": they put < half an even share of evidence there
LESION_GAP = 0.2     # in-lesion share at least 20 points below the class's other images
OFF_WEIGHT = 5.0     # off-lesion coordinate = OFF_WEIGHT * median map distance * (1 - in_lesion)
RINGS = 6            # radial profile: rings of distance from the image centre
RADIAL_WEIGHT = 3.0  # a radial profile swing weighs as much as three typical differences in place
RING_LIFT = 2.0      # "a ring others do not use": the cluster's share there at least twice theirs
LOCAL_SCALE_K = 7    # Zelnik-Manor & Perona 2004: local scale = distance to the 7th neighbour


@dataclass
class Cluster:
    """One SpRAy cluster of a class. ``members`` index the N images; ``mean_map`` is ``[H,W]``."""
    class_index: int
    members: np.ndarray
    mean_map: np.ndarray
    in_lesion: float
    concentration: float
    flagged: bool
    reason: str


@dataclass
class AuditResult:
    """The audit of N maps ``[N,H,W]`` in K classes (field shapes in :func:`audit`). ``maps`` is a
    reference to the input maps (for the example panels of ``write_audit_html``), not a copy."""
    class_names: list[str]
    counts: np.ndarray
    mean_maps: np.ndarray
    in_lesion: np.ndarray
    class_in_lesion: np.ndarray
    clusters: list[Cluster]
    eigengaps: dict
    maps: np.ndarray | None = field(default=None, repr=False)

    def flagged(self) -> list[Cluster]:
        """The flagged clusters, in audit order."""
        return [c for c in self.clusters if c.flagged]

    def to_dict(self) -> dict:
        """JSON-ready summary: figures and member lists, maps left out, NaN written as None."""
        return {
            "class_names": list(self.class_names), "counts": [int(x) for x in self.counts],
            "class_in_lesion": [_num(x) for x in self.class_in_lesion],
            "in_lesion": [_num(x) for x in self.in_lesion],
            "eigengaps": {str(k): [_num(x) for x in v] for k, v in self.eigengaps.items()},
            "clusters": [{"class_index": int(c.class_index), "class_name": self.class_names[c.class_index],
                          "size": int(len(c.members)), "members": [int(i) for i in c.members],
                          "in_lesion": _num(c.in_lesion), "concentration": _num(c.concentration),
                          "flagged": bool(c.flagged), "reason": c.reason} for c in self.clusters],
            "flag_rule": {"top_share": TOP_SHARE, "concentrated": CONCENTRATED, "place_lift": PLACE_LIFT,
                          "lesion_gap": LESION_GAP, "off_weight": OFF_WEIGHT},
        }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _check_maps(maps) -> np.ndarray:
    maps = np.asarray(maps)
    _require(maps.ndim == 3 and 0 not in maps.shape, f"maps must be a non-empty [N,H,W] array, got {maps.shape}")
    _require(np.issubdtype(maps.dtype, np.number) or maps.dtype == bool, f"maps must be numeric, not {maps.dtype}")
    _require(bool(np.all(np.isfinite(maps))), "maps hold NaN or Inf values")
    _require(maps.min() >= 0, f"maps must be >= 0 (evidence), found a value {float(maps.min()):.4g}")
    return maps


def _check_lesions(lesions, has_lesion, shape) -> tuple[np.ndarray | None, np.ndarray]:
    n = shape[0]
    if lesions is None:
        _require(has_lesion is None or not np.any(has_lesion), "has_lesion marks lesions but lesions is None")
        return None, np.zeros(n, bool)
    lesions = np.asarray(lesions)
    _require(lesions.shape == tuple(shape), f"lesions must be shaped like maps {tuple(shape)}, got {lesions.shape}")
    if lesions.dtype != bool:
        _require(bool(np.all((lesions == 0) | (lesions == 1))), "lesions must be boolean masks (or 0/1 values)")
        lesions = lesions.astype(bool)
    if has_lesion is None:
        return lesions, lesions.reshape(n, -1).any(1)
    has = np.asarray(has_lesion)
    _require(has.shape == (n,), f"has_lesion must be [N]={n} booleans, got shape {has.shape}")
    return lesions, has.astype(bool)


def in_lesion_share(maps, lesions, has_lesion=None) -> np.ndarray:
    """Share of each image's evidence inside its lesion, ``[N]`` floats in [0,1].

    ``maps`` ``[N,H,W]`` >= 0; ``lesions`` ``[N,H,W]`` bool (None: all NaN); ``has_lesion`` ``[N]``
    bool (default: lesion non-empty). NaN where an image has no lesion or an all-zero map. An image
    marked as having a lesion whose mask is empty gets 0 (none of its evidence is on it).
    """
    maps = _check_maps(maps)
    lesions, has = _check_lesions(lesions, has_lesion, maps.shape)
    out = np.full(maps.shape[0], np.nan)
    for i in np.flatnonzero(has):  # one image at a time: no [N,H,W] temporary
        total = float(maps[i].sum(dtype=np.float64))
        if total > 0:
            out[i] = min(1.0, float(maps[i][lesions[i]].sum(dtype=np.float64)) / total)
    return out


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` area-averaging weights: overlap of each input cell with each output cell."""
    edges, cells = np.linspace(0.0, n_in, n_out + 1), np.arange(n_in + 1, dtype=np.float64)
    w = np.clip(np.minimum(edges[1:, None], cells[None, 1:]) - np.maximum(edges[:-1, None], cells[None, :-1]),
                0.0, None)
    return w / w.sum(1, keepdims=True)


def _pairwise(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0, None))


def radial_profile(maps: np.ndarray, rings: int | None = None) -> np.ndarray:
    """``[N, RINGS]``: each map's evidence share per ring of distance from the image centre (ring r:
    distance / half-diagonal in [r/RINGS, (r+1)/RINGS)); zeros for an empty map. Where the evidence
    sits relative to the centre, whatever its direction: marks on any part of the border look alike."""
    rings = rings or RINGS
    h, w = maps.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / np.hypot((h - 1) / 2, (w - 1) / 2)
    ring = np.minimum((r * rings).astype(int), rings - 1).ravel()
    onehot = np.eye(rings)[ring]                                   # [H*W, RINGS]
    prof = maps.reshape(len(maps), -1).astype(np.float64) @ onehot
    total = prof.sum(1, keepdims=True)
    return np.divide(prof, total, out=np.zeros_like(prof), where=total > 0)


def _features(maps: np.ndarray, share: np.ndarray, size: int) -> np.ndarray:
    """``[m, size*size+RINGS+1]``: unit-sum area-averaged maps, the scaled radial profile
    (:func:`radial_profile`, ``RADIAL_WEIGHT`` typical distances) and one scaled off-lesion coordinate.

    The off-lesion coordinate is ``OFF_WEIGHT * (median pairwise map distance) * (1 - in_lesion)``
    (0.5 where unknown): a swing from on to off the lesion weighs as much as five typical differences
    in place, whatever the maps' sharpness, so shortcut images group although their marks sit in
    different corners. With no lesion known it is constant and changes nothing.
    """
    small = _area_matrix(maps.shape[1], size) @ maps.astype(np.float64) @ _area_matrix(maps.shape[2], size).T
    small = small.reshape(len(maps), -1)
    total = small.sum(1, keepdims=True)
    f = np.divide(small, total, out=np.zeros_like(small), where=total > 0)  # an empty map stays zero
    d = _pairwise(f)[np.triu_indices(len(f), 1)]
    scale = float(np.median(d[d > 0])) if np.any(d > 0) else 1.0
    off = np.where(np.isnan(share), 0.5, 1.0 - share)
    radial = radial_profile(maps) * (RADIAL_WEIGHT * scale)
    return np.concatenate([f, radial, (OFF_WEIGHT * scale * off)[:, None]], axis=1)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Seeded k-means++ with ``n_init`` restarts; the labels ``[n]`` of the lowest inertia."""
    best_inertia, best = np.inf, None
    for _ in range(n_init):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):  # k-means++: the next centre drawn in proportion to squared distance
            d2 = ((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
            centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        c = np.array(centres)
        for _ in range(iters + 1):
            d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            lab = d2.argmin(1)
            # an emptied centre moves to the worst-served point
            new = np.array([x[lab == j].mean(0) if np.any(lab == j) else x[d2.min(1).argmax()] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = float(d2[np.arange(len(x)), lab].sum())
        if inertia < best_inertia - 1e-12:
            best_inertia, best = inertia, lab
    return best


def spectral_clusters(features, k_max: int = 6, n_neighbors: int | None = None, seed: int = 0):
    """Self-tuning spectral clustering of ``features`` ``[n,D]``; returns ``(labels [n], eigenvalues)``.

    Symmetric k-nearest-neighbour graph (``n_neighbors``, default ``max(7, round(sqrt(n)))``, at most
    n-1) with affinities ``exp(-d^2 / (s_i s_j))``, ``s_i`` the distance to the 7th neighbour
    (Zelnik-Manor & Perona 2004); normalised Laplacian ``I - D^-1/2 A D^-1/2``; k in
    1..min(k_max, n-1) at the largest eigengap; k-means on the row-normalised first k eigenvectors.
    Labels are numbered by first appearance; ``eigenvalues``: the smallest min(k_max, n-1)+1.
    Deterministic for a given seed.
    """
    x = np.asarray(features, dtype=np.float64)
    _require(x.ndim == 2 and x.shape[0] > 0, f"features must be [n,D] with n >= 1, got shape {x.shape}")
    _require(bool(np.all(np.isfinite(x))), "features hold NaN or Inf values")
    _require(k_max >= 1, f"k_max must be >= 1, got {k_max}")
    n = len(x)
    if n == 1:
        return np.zeros(1, dtype=np.int64), [0.0]
    nn = int(n_neighbors) if n_neighbors is not None else max(LOCAL_SCALE_K, int(round(math.sqrt(n))))
    nn = min(max(nn, 1), n - 1)
    d = _pairwise(x)
    np.fill_diagonal(d, np.inf)  # so that a duplicate never hides behind the point itself
    order = np.argsort(d, axis=1, kind="stable")
    np.fill_diagonal(d, 0.0)
    sigma = d[np.arange(n), order[:, min(LOCAL_SCALE_K, n - 1) - 1]]
    positive = d[d > 0]
    sigma = np.maximum(sigma, 1e-3 * float(np.median(positive)) if positive.size else 1.0)  # duplicates
    knn = np.zeros((n, n), bool)
    knn[np.repeat(np.arange(n), nn), order[:, :nn].ravel()] = True
    knn |= knn.T
    # a floor on graph edges: a far neighbour of a tight group keeps a negligible edge, never degree 0
    a = np.where(knn, np.maximum(np.exp(-(d ** 2) / np.outer(sigma, sigma)), 1e-12), 0.0)
    dinv = 1.0 / np.sqrt(a.sum(1))
    lap = np.eye(n) - dinv[:, None] * a * dinv[None, :]
    w, v = np.linalg.eigh((lap + lap.T) / 2)
    w = np.clip(w, 0.0, 2.0)
    kk = min(k_max, n - 1)
    k = int(np.argmax(np.diff(w[:kk + 1]))) + 1  # the first largest gap: eigenvalues 0..k-1 are small
    eigenvalues = [float(e) for e in w[:kk + 1]]
    if k == 1:
        return np.zeros(n, dtype=np.int64), eigenvalues
    u = v[:, :k]
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    lab = _kmeans(np.divide(u, norms, out=np.zeros_like(u), where=norms > 0), k, np.random.default_rng(seed))
    _, first = np.unique(lab, return_index=True)
    relabel = np.empty(k, dtype=np.int64)
    relabel[lab[np.sort(first)]] = np.arange(len(first))
    return relabel[lab], eigenvalues


def _place(mean_map: np.ndarray) -> tuple[float, np.ndarray]:
    """Concentration (mass share of the top ``TOP_SHARE`` pixels; 0 for an all-zero map) and the core
    (flat indices of the fewest top pixels holding half the mass) of a map ``[H,W]``."""
    flat = mean_map.ravel()
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order])
    if cum[-1] <= 0:
        return 0.0, order[:1]
    top = max(1, int(math.ceil(TOP_SHARE * flat.size)))
    return float(cum[top - 1] / cum[-1]), order[:int(np.searchsorted(cum, 0.5 * cum[-1])) + 1]


def _ring_lift(maps: np.ndarray, members: np.ndarray) -> tuple[bool, str]:
    """Whether the cluster's evidence sits at a distance from the centre (its core rings: the fewest
    holding half its mean radial profile) that the images outside it use ``RING_LIFT`` times less."""
    prof = radial_profile(maps)
    inside = prof[members].mean(0)
    rest = np.delete(prof, members, axis=0)
    rest = rest[rest.sum(1) > 0]
    if not rest.size or inside.sum() <= 0:
        return False, "no other evidence to compare its rings with"
    order = np.argsort(-inside, kind="stable")
    core = order[:int(np.searchsorted(np.cumsum(inside[order]), 0.5)) + 1]
    own, others = float(inside[core].sum()), float(rest.mean(0)[core].sum())
    lifted = own >= RING_LIFT * others
    return lifted, (f"{own:.0%} of its evidence in rings {sorted(int(r) for r in core)} of {RINGS} from the centre, "
                    f"where the other images put {others:.0%}")


def _judge(c, members, class_idx, maps, maps_sum, share, off_lesion, min_cluster) -> Cluster:
    mean_map = maps[members].mean(0, dtype=np.float64)
    (conc, core), m, flagged = _place(mean_map), len(members), False
    known = share[members][~np.isnan(share[members])]
    in_l = float(known.mean()) if known.size else float("nan")
    if known.size:
        # compared with the class's other images with a lesion; where there is none (the class is one
        # cluster), with every other image with a lesion, so that a class-wide low share (diffuse maps)
        # is not read as a shortcut
        ref, who = share[np.setdiff1d(class_idx, members)], "the class's other images"
        if np.all(np.isnan(ref)):
            ref, who = np.delete(share, members), "the other classes' images"
        ref = ref[~np.isnan(ref)]
        other = float(ref.mean()) if ref.size else float("nan")
        cmp = f"against {other:.0%} for {who}" if ref.size else "(no other image has a lesion to compare with)"
        reason = (f"evidence {in_l:.0%} in the lesion ({known.size} of {m} members with a lesion) {cmp}; "
                  f"{conc:.0%} of the mean evidence in {TOP_SHARE:.0%} of the image")
        off, below = in_l < 1 - off_lesion, not ref.size or other - in_l >= LESION_GAP
        ring_ok, ring_text = _ring_lift(maps, members)
        flagged = m >= min_cluster and off and (below or ring_ok)
        reason += "; " + ring_text
        if flagged:
            reason += f"; flagged: mostly off the lesion (below {1 - off_lesion:.0%})"
            reason += (f" and {LESION_GAP:.0%} or more below {who}" if ref.size and other - in_l >= LESION_GAP
                       else f" and in a ring of the image the other images use {RING_LIFT:g}x less")
        elif not off:
            reason += f"; not flagged: at least {1 - off_lesion:.0%} in the lesion"
        else:
            reason += (f"; not flagged: less than {LESION_GAP:.0%} below {who}, and no ring of its own")
    else:
        # the place: the cluster's core; compared with every image outside the cluster, not only its
        # class's other images, which the clustering has already split off by place
        ref_sum = np.clip(maps_sum - m * mean_map, 0.0, None).ravel()  # summed maps outside the cluster
        total = float(ref_sum.sum()) if m < len(maps) else 0.0
        ref_share, even = (float(ref_sum[core].sum()) / total if total > 0 else 0.0), core.size / mean_map.size
        reason = (f"no member has a lesion; {conc:.0%} of the cluster's mean evidence lies in {TOP_SHARE:.0%} of "
                  f"the image; its core ({even:.1%} of the image, half of that evidence) holds {ref_share:.1%} "
                  f"of the evidence of the images outside the cluster (an even spread: {even:.1%})")
        if total <= 0:
            reason += "; not flagged: no evidence outside the cluster to compare the place with"
        elif conc < CONCENTRATED:
            reason += f"; not flagged: not concentrated (below {CONCENTRATED:.0%})"
        elif ref_share >= PLACE_LIFT * even:
            reason += f"; not flagged: the other images use that place too (at least {PLACE_LIFT:.0%} of even)"
        else:
            flagged = m >= min_cluster
            reason += "; flagged: evidence piled in one place the other images do not use" if flagged else ""
    if m < min_cluster:
        reason += f"; not flagged: {m} member(s), fewer than {min_cluster}"
    return Cluster(int(c), members, mean_map, in_l, conc, bool(flagged), reason)


def audit(maps, labels, class_names, lesions=None, has_lesion=None, size: int = 16, k_max: int = 6,
          seed: int = 0, off_lesion: float = 0.5, min_cluster: int = 3) -> AuditResult:
    """SpRAy shortcut audit of ``maps`` ``[N,H,W]`` (>= 0) with ``labels`` ``[N]`` in ``range(K)``.

    ``lesions`` ``[N,H,W]`` bool or None; ``has_lesion`` ``[N]`` bool (default: lesion non-empty).
    Per class: :func:`_features` (``size`` x ``size`` maps), :func:`spectral_clusters` (a class of
    fewer than ``2*min_cluster`` images is one cluster), then the module docstring's flag rule.
    Result: ``counts`` ``[K]``, ``mean_maps`` ``[K,H,W]``, ``in_lesion`` ``[N]``, ``class_in_lesion``
    ``[K]``, clusters class by class. Raises ValueError on bad shapes or values, labels out of range,
    N == 0. Cost per class of n images: O(n^2) memory, O(n^3) time (a dense ``eigh``), so a class
    of a few thousand images is the practical limit (subsample beyond that).
    """
    maps = _check_maps(maps)
    n, h, w = maps.shape
    class_names = [str(s) for s in class_names]
    _require(len(class_names) > 0, "class_names is empty")
    labels = np.asarray(labels)
    _require(labels.shape == (n,), f"labels must be [N]={n}, got shape {labels.shape}")
    _require(np.issubdtype(labels.dtype, np.integer) or (np.issubdtype(labels.dtype, np.floating)
             and bool(np.all(np.mod(labels, 1) == 0))), f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must lie in 0..{len(class_names) - 1} ({len(class_names)} class names), "
                         f"found {int(labels.min())}..{int(labels.max())}")
    _require(min(size, k_max, min_cluster) >= 1,
             f"size, k_max, min_cluster must be >= 1, got {size}, {k_max}, {min_cluster}")
    _require(0 < off_lesion < 1, f"off_lesion must lie in (0, 1), got {off_lesion}")
    lesions, has = _check_lesions(lesions, has_lesion, maps.shape)
    share = in_lesion_share(maps, lesions, has) if lesions is not None else np.full(n, np.nan)

    k_classes = len(class_names)
    counts = np.bincount(labels, minlength=k_classes)
    mean_maps, class_in = np.zeros((k_classes, h, w)), np.full(k_classes, np.nan)
    clusters, eigen, maps_sum = [], {}, maps.sum(0, dtype=np.float64)
    for c in range(k_classes):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            continue
        mean_maps[c] = maps[idx].mean(0, dtype=np.float64)
        if np.any(~np.isnan(share[idx])):
            class_in[c] = float(np.nanmean(share[idx]))
        if idx.size < 2 * min_cluster:
            lab, eigen[c] = np.zeros(idx.size, dtype=np.int64), []
        else:
            lab, eigen[c] = spectral_clusters(_features(maps[idx], share[idx], size), k_max, seed=seed)
        for j in range(int(lab.max()) + 1):
            clusters.append(_judge(c, idx[lab == j], idx, maps, maps_sum, share, off_lesion, min_cluster))
    return AuditResult(class_names, counts, mean_maps, share, class_in, clusters, eigen, maps)

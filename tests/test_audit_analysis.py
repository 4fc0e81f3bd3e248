"""Shortcut audit (SpRAy): a planted shortcut comes out flagged by itself; in-lesion shares by hand;
spectral clustering on blobs; input checks; the HTML page. numpy only, no torch compute, ~1 s."""
import base64
import io
import json
import math
import re
from html import escape

import numpy as np
import pytest
from PIL import Image

from medcam_fast.audit import audit, in_lesion_share, spectral_clusters, write_audit_html

S = 64
YY, XX = np.mgrid[:S, :S]
NAMES = ["benign", "malignant", "normal"]


def disc(cy, cx, r):
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def make_archive(seed=0, n_per=30, shortcut=1 / 3, same_corner=False):
    """3 classes of 64x64 evidence maps. Lesion: a disc at a random place inside the "organ" (the
    central disc of radius ~22). Clean images: evidence on their lesion (jittered, a little too small
    or large) plus 6 stray pixels. In class 1, a share ``shortcut`` of the images are shortcut images:
    evidence on a 6-9 px square at a random corner (always the top-left one with ``same_corner``),
    plus a small disc on the lesion. Returns maps [N,S,S], labels [N], lesions [N,S,S], planted [N]."""
    rng = np.random.default_rng(seed)
    maps, labels, lesions, planted = [], [], [], []
    for c in range(3):
        n_short = int(round(n_per * shortcut)) if c == 1 else 0
        for i in range(n_per):
            a, r = rng.uniform(0, 2 * np.pi), rng.uniform(0, 14)
            cy, cx, rad = 32 + r * np.sin(a), 32 + r * np.cos(a), rng.uniform(5, 8)
            m = np.zeros((S, S))
            if i < n_short:
                corner, side = (0 if same_corner else rng.integers(4)), rng.integers(6, 10)
                oy, ox = rng.integers(1, 4, 2)
                y0 = oy if corner in (0, 1) else S - oy - side
                x0 = ox if corner in (0, 2) else S - ox - side
                m[y0:y0 + side, x0:x0 + side] = 1.0
                m[disc(cy, cx, 2)] = 1.0
            else:
                jy, jx = rng.normal(0, 1.5, 2)
                m[disc(cy + jy, cx + jx, rad * rng.uniform(0.8, 1.1))] = 1.0
                stray = rng.integers(0, S, (6, 2))
                m[stray[:, 0], stray[:, 1]] = 1.0
            maps.append(m)
            labels.append(c)
            lesions.append(disc(cy, cx, rad))
            planted.append(i < n_short)
    order = rng.permutation(len(maps))
    return (np.array(maps)[order], np.array(labels)[order], np.array(lesions)[order], np.array(planted)[order])


def flagged_members(result):
    out = np.zeros(len(result.in_lesion), bool)
    for c in result.flagged():
        out[c.members] = True
    return out


def purity_recall(flagged, planted):
    hit = int((flagged & planted).sum())
    return hit / max(int(flagged.sum()), 1), hit / int(planted.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_shortcut_at_random_corners_is_flagged_with_lesions(seed):
    maps, labels, lesions, planted = make_archive(seed)
    result = audit(maps, labels, NAMES, lesions=lesions, seed=0)
    purity, recall = purity_recall(flagged_members(result), planted)
    assert purity >= 0.9 and recall >= 0.9, (purity, recall, [c.reason for c in result.clusters])
    assert all(c.class_index == 1 for c in result.flagged()), [c.reason for c in result.flagged()]
    for c in result.flagged():
        assert c.in_lesion < 0.5 and "in the lesion" in c.reason and "flagged" in c.reason
        assert re.search(r"evidence \d+% in the lesion .* against \d+% for the class's other images", c.reason)
    # the archive-wide figures, against numpy directly
    assert result.counts.tolist() == [30, 30, 30]
    np.testing.assert_allclose(result.mean_maps[2], maps[labels == 2].mean(0))
    share = in_lesion_share(maps, lesions)
    np.testing.assert_allclose(result.in_lesion, share)
    np.testing.assert_allclose(result.class_in_lesion, [share[labels == k].mean() for k in range(3)])
    assert result.class_in_lesion[0] > 0.6 and result.class_in_lesion[1] < result.class_in_lesion[0] - 0.15
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert sum(c["flagged"] for c in summary["clusters"]) == len(result.flagged())
    assert sorted(i for c in summary["clusters"] for i in c["members"]) == list(range(len(maps)))


@pytest.mark.parametrize("seed", [0, 3])
def test_same_place_shortcut_is_flagged_by_concentration_without_lesions(seed):
    maps, labels, _, planted = make_archive(seed, same_corner=True)
    result = audit(maps, labels, NAMES, lesions=None, seed=0)
    purity, recall = purity_recall(flagged_members(result), planted)
    assert purity >= 0.9 and recall >= 0.9, (purity, recall, [c.reason for c in result.clusters])
    assert all(c.class_index == 1 for c in result.flagged())
    for c in result.flagged():
        assert math.isnan(c.in_lesion) and c.concentration >= 0.5 and "no member has a lesion" in c.reason
    assert np.all(np.isnan(result.in_lesion))


def test_random_place_without_lesions_and_clean_archives_are_not_flagged():
    maps, labels, lesions, _ = make_archive(4, shortcut=0.0)
    assert audit(maps, labels, NAMES, lesions=lesions).flagged() == []
    assert audit(maps, labels, NAMES).flagged() == []


def test_in_lesion_share_by_hand():
    maps = np.zeros((5, 2, 2))
    lesions = np.zeros((5, 2, 2), bool)
    maps[0] = [[1, 1], [0, 2]]
    lesions[0] = [[True, False], [False, True]]        # (1 + 2) / 4
    maps[1] = [[0.5, 0.5], [0, 0]]
    lesions[1] = [[False, False], [True, True]]        # all evidence off the lesion: 0
    lesions[2] = [[True, True], [False, False]]        # empty map: nan
    maps[3] = [[1, 0], [0, 0]]                         # no lesion: nan
    maps[4] = [[3, 0], [0, 1]]
    lesions[4] = [[False, False], [False, True]]       # 1 / 4
    got = in_lesion_share(maps, lesions)
    np.testing.assert_allclose(got, [0.75, 0.0, np.nan, np.nan, 0.25])
    # has_lesion overrides the default (lesion non-empty): image 4 marked as without a lesion,
    # image 3 marked as with one whose mask is empty (none of its evidence on it)
    got = in_lesion_share(maps, lesions, has_lesion=np.array([True, True, True, True, False]))
    np.testing.assert_allclose(got, [0.75, 0.0, np.nan, 0.0, np.nan])
    assert np.all(np.isnan(in_lesion_share(maps, None)))


def test_audit_is_deterministic_for_a_seed():
    maps, labels, lesions, _ = make_archive(5)
    a = audit(maps, labels, NAMES, lesions=lesions, seed=7)
    b = audit(maps.copy(), labels.copy(), NAMES, lesions=lesions.copy(), seed=7)
    assert [(c.class_index, c.members.tolist(), c.flagged, c.reason) for c in a.clusters] == \
           [(c.class_index, c.members.tolist(), c.flagged, c.reason) for c in b.clusters]
    assert a.eigengaps == b.eigengaps
    x = np.random.default_rng(0).normal(size=(40, 6))
    assert spectral_clusters(x, seed=3)[0].tolist() == spectral_clusters(x, seed=3)[0].tolist()


def test_spectral_clusters_separates_three_blobs():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 5, 0]], dtype=float)
    truth = np.repeat([0, 1, 2], [15, 20, 25])
    order = rng.permutation(len(truth))
    truth = truth[order]
    x = centres[truth] + rng.normal(0, 0.5, (len(truth), 4))
    labels, eigenvalues = spectral_clusters(x, k_max=6)
    assert len(eigenvalues) == 7 and eigenvalues == sorted(eigenvalues)
    assert eigenvalues[2] < 1e-6 < eigenvalues[3]                # three components, then a gap
    assert len(set(labels.tolist())) == 3
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 3                                       # a one-to-one match: exact
    assert labels[0] == 0                                        # numbered by first appearance
    one, _ = spectral_clusters(x[truth == 0], k_max=1)
    assert set(one.tolist()) == {0}


def test_small_class_is_one_cluster():
    maps, labels, lesions, _ = make_archive(6)
    keep = np.flatnonzero(labels != 2).tolist() + np.flatnonzero(labels == 2)[:5].tolist()
    result = audit(maps[keep], labels[keep], NAMES, lesions=lesions[keep], min_cluster=3)
    small = [c for c in result.clusters if c.class_index == 2]
    assert len(small) == 1 and len(small[0].members) == 5 and result.eigengaps[2] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(maps=np.ones((4, 8))), r"\[N,H,W\]"),
    (dict(maps=np.zeros((0, 8, 8)), labels=np.zeros(0, int)), "non-empty"),
    (dict(maps=-np.ones((4, 8, 8))), ">= 0"),
    (dict(maps=np.full((4, 8, 8), np.nan)), "NaN"),
    (dict(labels=np.array([0, 1, 2, 3])), r"0\.\.2"),
    (dict(labels=np.array([0, 1, -1, 2])), r"0\.\.2"),
    (dict(labels=np.array([0, 1, 2])), r"labels must be \[N\]=4"),
    (dict(labels=np.array([0.5, 1, 2, 0])), "integers"),
    (dict(class_names=[]), "class_names"),
    (dict(lesions=np.zeros((4, 8, 9), bool)), "shaped like maps"),
    (dict(lesions=np.full((4, 8, 8), 2)), "boolean"),
    (dict(has_lesion=np.ones(4, bool)), "lesions is None"),
    (dict(lesions=np.zeros((4, 8, 8), bool), has_lesion=np.ones(3, bool)), "has_lesion"),
    (dict(off_lesion=1.0), "off_lesion"),
    (dict(min_cluster=0), "min_cluster"),
])
def test_bad_inputs_raise_value_error(kwargs, message):
    args = dict(maps=np.ones((4, 8, 8)), labels=np.array([0, 1, 2, 0]), class_names=NAMES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        audit(**args)


def test_spectral_clusters_bad_features():
    with pytest.raises(ValueError, match=r"\[n,D\]"):
        spectral_clusters(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        spectral_clusters(np.array([[0.0], [np.nan]]))


def test_write_audit_html(tmp_path):
    maps, labels, lesions, planted = make_archive(0)
    names = ["benign", '"<b>"', "normal"]                         # the shortcut class has the odd name
    result = audit(maps, labels, names, lesions=lesions)
    assert result.flagged()
    images = np.repeat((40 + 150 * disc(32, 32, 22))[None, ..., None], len(maps), 0).repeat(3, -1).astype(np.uint8)
    ids = [f"case<{i}>&" for i in range(len(maps))]
    out = write_audit_html(tmp_path / "sub" / "audit.html", result, images=images, ids=ids,
                           notes=["synthetic <archive>"], max_examples=4)
    assert out == tmp_path / "sub" / "audit.html" and not (tmp_path / "sub" / "audit.html.part").exists()
    text = out.read_text(encoding="utf-8")
    assert "benign" in text and "normal" in text and "&quot;&lt;b&gt;&quot;" in text
    assert '"<b>"' not in text and "<archive>" not in text and "case<0>" not in text
    assert "synthetic &lt;archive&gt;" in text and any(escape(i) in text for i in ids)
    for c in result.flagged():
        assert escape(c.reason) in text
    # a mean map per class, one per cluster, up to 4 examples per cluster
    n_img = text.count("<img")
    assert n_img >= 3 + len(result.clusters) + 4 * len(result.flagged()), n_img
    first = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(first))).size[0] == 128
    assert text.index('class="cluster flagged"') < text.index('class="cluster"')  # flagged first
    with pytest.raises(ValueError, match="ids"):
        write_audit_html(tmp_path / "x.html", result, ids=["a"])
    with pytest.raises(ValueError, match="uint8"):
        write_audit_html(tmp_path / "x.html", result, images=images.astype(float))
    bare = write_audit_html(tmp_path / "bare.html", result, max_examples=4)  # no thumbnails: over grey
    assert bare.read_text(encoding="utf-8").count("<img") == n_img


def test_radial_profile_places_evidence_by_distance_from_the_centre():
    from medcam_fast.audit.analysis import RINGS, radial_profile

    maps = np.zeros((3, 64, 64))
    maps[0, 31:33, 31:33] = 1.0                    # the centre
    maps[1, 0:2, 62:64] = 1.0                      # a corner: the outermost ring
    prof = radial_profile(maps)
    assert prof.shape == (3, RINGS) and prof[0, 0] == 1.0 and prof[1, RINGS - 1] == 1.0
    assert np.all(prof[2] == 0)                    # an empty map stays empty
    maps[2, 0:2, 0:2] = 1.0
    maps[2, 62:64, 0:2] = 1.0                      # two corners: the same profile as one
    assert np.allclose(radial_profile(maps)[2], prof[1])

"""``medcam-fast audit`` end to end, in this process (no Ray): a hand-set classifier whose class 1
rests on a planted corner mark alone (TwoCueClassifier, needs_lesion=False), an archive of PNGs with
lesion masks where half the images carry the mark; the audit must flag the marked images as their
own cluster with nothing told, write audit.html / audit.json and resume without redoing anything."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medcam_fast.cli import main

from planted import MARK_VALUE, TwoCueClassifier, make_two_cue

MEAN, STD = 0.2, 0.4            # PNG u = x * STD + MEAN: the archive's pixels in [0, 1], the mark at 1.0


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    model = TwoCueClassifier(needs_lesion=False).eval()
    program = torch.export.export(model, (torch.zeros(2, 1, 64, 64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(root / "two_cue.pt2"))
    x, lesion = make_two_cue(24, seed=3)
    marked = torch.arange(24) % 2 == 0
    g = torch.Generator().manual_seed(4)
    for i in torch.nonzero(marked)[:, 0].tolist():    # a 5x5 mark in a random corner, off every lesion
        r, c = [int(v) * 57 + 1 for v in torch.randint(0, 2, (2,), generator=g)]
        x[i, 0, r:r + 5, c:c + 5] = MARK_VALUE
    (root / "images").mkdir()
    (root / "masks").mkdir()
    u = ((x[:, 0] * STD + MEAN).clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    for i in range(24):
        Image.fromarray(u[i]).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(lesion[i].numpy().astype(np.uint8) * 255).save(root / "masks" / f"case{i:02d}.png")
    return root, marked


def test_audit_flags_the_marked_images_unaided_and_resumes(archive, capsys):
    root, marked = archive
    argv = ["audit", "--model", str(root / "two_cue.pt2"), "--size", "64", "--mean", str(MEAN), "--std", str(STD),
            "--input", str(root / "images"), "--mask-dir", str(root / "masks"), "--out", str(root / "out"),
            "--steps", "12", "--batch", "12", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((root / "out" / "audit.json").read_text())
    ids = summary["ids"]
    assert sorted(ids) == sorted(str(root / "images" / f"case{i:02d}.png") for i in range(24))
    planted = {ids.index(str(root / "images" / f"case{i:02d}.png")) for i in range(24) if marked[i]}
    flagged = [c for c in summary["clusters"] if c["flagged"]]
    assert flagged, "the marked images were not flagged"
    members = {m for c in flagged for m in c["members"]}
    purity, recall = len(members & planted) / len(members), len(members & planted) / len(planted)
    assert purity >= 0.9 and recall >= 0.9, (purity, recall, [c["reason"] for c in flagged])
    assert all(c["class_name"] == "1" for c in flagged) and "lesion" in flagged[0]["reason"]
    html = (root / "out" / "audit.html").read_text()
    assert "<img" in html and flagged[0]["reason"].split(" ")[0] in html
    assert "flagged" in capsys.readouterr().out
    parts = sorted((root / "out" / "explanations").glob("part-*.parquet"))
    assert main(argv) == 0                                  # a rerun resumes: nothing explained again
    assert sorted((root / "out" / "explanations").glob("part-*.parquet")) == parts
    assert json.loads((root / "out" / "audit.json").read_text())["clusters"] == summary["clusters"]


def test_audit_says_what_is_missing(archive, capsys):
    root, _ = archive
    base = ["audit", "--model", str(root / "two_cue.pt2"), "--size", "64", "--input", str(root / "images"),
            "--out", str(root / "bad")]
    assert main(base + ["--workers", "-1"]) == 2 and "--workers must be >= 0" in capsys.readouterr().err
    assert main(base + ["--mask-dir", str(root / "nope")]) == 2 and "is not a folder" in capsys.readouterr().err

"""Report: panel PNGs (gray/RGB, with and without ground truth and Grad-CAM, outlines drawn in their
colours), report.html (escaping, relative links, the blank-image sentence) and results.json."""
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import matplotlib  # noqa: F401  (pinned in requirements.txt: a missing one fails, not skips)

from medcam_fast import report  # noqa: E402
from medcam_fast.report import blank_image_sentence, panel_png, text_table, write_report  # noqa: E402
from medcam_fast.report.panels import GT_COLOUR, MASK_COLOUR  # noqa: E402

H = W = 48


def make_row(**changes):
    row = {"name": "img_0", "label": 1, "class_name": "meningioma", "prob_input": 0.91, "prob_evidence": 0.83,
           "kept_on_baseline": True, "kept_robust": 0.875, "area": 0.12, "prob_null": 0.05, "null_keeps_label": False,
           "status": "ok", "reason": "kept, robust, minimal", "selection": "threshold", "steps": 5,
           "seconds": 0.42}
    row.update(changes)
    return row


def inputs(channels):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(channels, H, W, generator=g) * 0.5
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[10:25, 12:30] = True
    evidence = image * mask + (~mask) * 0.2
    gt = torch.zeros(H, W, dtype=torch.bool)
    gt[20:40, 20:40] = True
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    cam = torch.exp(-((yy - 24.0) ** 2 + (xx - 24.0) ** 2) / 200)
    return image, mask, evidence, gt, cam


def has_colour(png, hex_colour, tol=40, min_pixels=20) -> bool:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(-1) < tol).sum()) >= min_pixels


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("with_gt,with_cam", [(False, False), (True, False), (False, True), (True, True)])
def test_panel_png(tmp_path, channels, with_gt, with_cam):
    image, mask, evidence, gt, cam = inputs(channels)
    path = panel_png(tmp_path / "sub" / "p.png", image, make_row(), mask, evidence,
                     gt if with_gt else None, cam if with_cam else None, title="img_0")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    width, height = Image.open(path).size
    assert width > height                                               # one row of panels
    assert has_colour(path, MASK_COLOUR)                                # the mask outline is drawn
    assert has_colour(path, GT_COLOUR) == with_gt                       # the GT outline only when given


def test_panel_width_grows_with_panels(tmp_path):
    image, mask, evidence, gt, cam = inputs(1)
    w3 = Image.open(panel_png(tmp_path / "a.png", image, make_row(), mask, evidence)).size[0]
    w5 = Image.open(panel_png(tmp_path / "b.png", image, make_row(), mask, evidence, gt, cam)).size[0]
    assert w5 > w3 * 1.5


def test_panel_plots_the_evidence_curve(tmp_path):
    image, mask, evidence, _, _ = inputs(1)
    areas = [0.01, 0.02, 0.05, 0.1, 0.3, 0.9]
    row = make_row(curve_areas=areas, evidence_curve=[0.1, 0.2, 0.7, 0.8, 0.9, 0.95], a_star=0.05, sufficient=True,
                   random_pass=0.0)
    w3 = Image.open(panel_png(tmp_path / "a.png", image, make_row(), mask, evidence)).size[0]
    w4 = Image.open(panel_png(tmp_path / "b.png", image, row, mask, evidence)).size[0]
    assert w4 > w3 * 1.2                                                # a fourth panel: the curve
    t = report.panel_title(row)
    assert "a*: 5.0%" in t and "sufficient: yes" in t and "random_pass: 0.00" in t
    # a curve of NaNs only (no certified fill) is left out rather than drawn empty
    nan_row = make_row(curve_areas=areas, evidence_curve=[None] * len(areas))
    assert Image.open(panel_png(tmp_path / "c.png", image, nan_row, mask, evidence)).size[0] == w3


def test_outline_not_filled(tmp_path):
    """A line, not a fill: inside a large mask most pixels keep the image's own (gray) values."""
    image = torch.full((1, H, W), 0.5)
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[4:44, 4:44] = True
    path = panel_png(tmp_path / "p.png", image, make_row(area=float(mask.float().mean())), mask, image * mask)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    want = np.array([int(MASK_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    outline = int((np.abs(rgb - want).max(-1) < 40).sum())
    assert 0 < outline < 0.1 * rgb.shape[0] * rgb.shape[1]


@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full_masks(tmp_path, fill):
    image, _, evidence, gt, cam = inputs(1)
    mask = torch.full((H, W), fill)
    path = panel_png(tmp_path / "p.png", image, make_row(area=float(fill), kept_robust=float("nan")), mask,
                     evidence, gt, cam)
    assert Image.open(path).size[0] > 0
    assert has_colour(path, MASK_COLOUR) == fill          # a full mask is still outlined (at the border)


def test_panel_rejects_mismatched_shapes(tmp_path):
    image, mask, evidence, _, _ = inputs(1)
    with pytest.raises(ValueError, match="mask"):
        panel_png(tmp_path / "p.png", image, make_row(), mask[:10], evidence)
    with pytest.raises(ValueError, match="gradcam"):
        panel_png(tmp_path / "p.png", image, make_row(), mask, evidence, gradcam=torch.zeros(5, 5))


def test_panel_title_numbers():
    t = report.panel_title(make_row(kept_robust=float("nan")), "x")
    for s in ("meningioma", "0.910", "0.830", "kept: yes", "sufficient: n/a", "12.0%", "a*: n/a", "random_pass: n/a",
              "status: ok", "0.42 s"):
        assert s in t
    assert "blank image" not in t
    assert "gives meningioma for a blank image" in report.panel_title(make_row(null_keeps_label=True))


# ---------------------------------------------------------------------------------------------------- HTML
def write(tmp_path, rows, **kw):
    image, mask, evidence, _, _ = inputs(1)
    panels = [panel_png(tmp_path / "panels" / f"{i}.png", image, r, mask, evidence) for i, r in enumerate(rows)]
    html, js = write_report(tmp_path, rows, panels, ["glioma", "meningioma", "pituitary"], kw.pop("title", "t"),
                            **kw)
    return open(html, encoding="utf-8").read(), json.load(open(js))


def test_html_escapes_all_text(tmp_path):
    nasty = '<script>alert("x")</script>'
    html, _ = write(tmp_path, [make_row(name=nasty, class_name="a&b<c>", reason="x<y", null_keeps_label=True)],
                    title="T <b>", notes=["note <i>1</i> & more"],
                    failures=[{"path": "dir/<evil>.png", "error": "bad & <worse>"}])
    assert "<script>" not in html and "T <b>" not in html and "<i>1</i>" not in html
    assert "<title>T &lt;b&gt;</title>" in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "a&amp;b&lt;c&gt;" in html and "note &lt;i&gt;1&lt;/i&gt; &amp; more" in html
    assert "dir/&lt;evil&gt;.png" in html and "bad &amp; &lt;worse&gt;" in html


def test_html_links_are_relative_and_exist(tmp_path):
    html, results = write(tmp_path, [make_row(name="a"), make_row(name="b")])
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(links) == 2
    for link in links:
        assert not link.startswith(("/", "http:", "https:", "file:")) and ".." not in link
        assert (tmp_path / link).is_file()
    assert [r["panel"] for r in results["rows"]] == links


def test_blank_image_sentence(tmp_path):
    html, results = write(tmp_path, [make_row(name="a", null_keeps_label=True, class_name="pituitary",
                                              status="null_keeps_label"), make_row(name="b")])
    assert "this classifier predicts pituitary for a blank image" in html
    assert "this classifier predicts meningioma for a blank image" not in html
    assert results["findings"] == [blank_image_sentence("pituitary")]
    html, results = write(tmp_path / "2", [make_row(name="a")])
    assert "for a blank image" not in html and results["findings"] == []


def test_html_table_columns(tmp_path):
    html, _ = write(tmp_path, [make_row(kept_robust=float("nan"))])
    for head in ("name", "label", "class name", "p(label | x)", "p(label | evidence)", "kept on baseline", "sufficient",
                 "area", "a*", "random_pass", "flipped when removed", "certified fills", "p(label | blank)",
                 "null_keeps_label", "kept_robust (audit)", "status", "seconds"):
        assert f"<th>{head}</th>" in html
    assert "<td>img_0</td>" in html and ">0.910<" in html and ">n/a<" in html


def test_results_json(tmp_path):
    _, results = write(tmp_path, [make_row(kept_robust=float("nan"))], metadata={"config": {"steps": 5}})
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text                                   # strict JSON
    assert results["rows"][0]["kept_robust"] is None and results["rows"][0]["prob_input"] == 0.91
    meta = results["metadata"]
    assert meta["config"] == {"steps": 5}
    env = meta["environment"]
    assert env["torch"] == torch.__version__ and "build_info" in env and "cpu_ops" in env["build_info"]
    assert "timm" in env and "onnxruntime" in env
    assert results["class_names"] == ["glioma", "meningioma", "pituitary"]


def test_write_report_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="panels"):
        write_report(tmp_path, [make_row()], [], ["a", "b"])


def test_text_table_one_line_per_row():
    rows = [make_row(name=f"n{i}", random_pass=float("nan") if i else 0.5) for i in range(3)]
    lines = text_table(rows).splitlines()
    assert len(lines) == 2 + 3 and lines[0].split()[0] == "name"
    assert lines[2].split()[0] == "n0" and "n/a" in lines[3] and "0.50" in lines[2]
    assert not math.isnan(rows[0]["random_pass"])


# ---------------------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_missing_module_gives_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "medcam_fast.baselines.gradcam", None)   # import raises ImportError
    maps, note = report.gradcam_maps(torch.nn.Identity(), torch.zeros(1, 1, 8, 8), torch.zeros(1).long())
    assert maps is None and "Grad-CAM" in note and "not available" in note


def test_gradcam_failure_gives_a_note():
    class NoConv(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    maps, note = report.gradcam_maps(NoConv(), torch.rand(2, 1, 8, 8), torch.zeros(2).long())
    assert maps is None and "left out" in note


def test_gradcam_maps_shape():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    maps, note = report.gradcam_maps(model, torch.rand(2, 1, 16, 16), torch.tensor([0, 2]))
    assert note is None and maps.shape == (2, 16, 16)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1

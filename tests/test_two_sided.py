"""Two-sided evidence: the necessary side (the smallest region whose removal loses the call under
every certified fill, with its random control) beside the sufficient one, on two hand-set
classifiers with known answers: a mark that is necessary but not sufficient alone, and one that
suffices alone."""
import pytest
import torch

from medcam_fast import MedCAMConfig, explain
from medcam_fast.data.shortcuts import get_shortcut
from medcam_fast.evaluation.cases import build_shortcut_cases
from medcam_fast.medcam.necessary import NECESSARY_SOURCES, necessary_status_of
from medcam_fast.medcam.result import Explanation

from _testing import devices
from planted import MARK_PIXELS, MARK_VALUE, TwoCueClassifier, make_two_cue

FAST = dict(steps=40, fit=dict(min_steps=20, check_every=10))
SOURCES = ("fit", "occlusion", "occlusion+fit")


def _cases(needs_lesion: bool, n: int, context: bool = False):
    """Two-cue cases (every image flipped to class 1 by the mark). ``context``: the checkerboard
    texture over the whole interior, not one lesion, so no region of up to a fifth of the image
    removes it: the mark is then the only small region the call needs, yet alone (the texture
    filled away) it does not keep the call."""
    model = TwoCueClassifier(needs_lesion)
    x, lesion = make_two_cue(n, seed=3)
    if context:
        ii = torch.arange(48)
        x[:, 0, 8:56, 8:56] += 0.5 * (1 - 2 * ((ii[:, None] + ii[None, :]) % 2)).float()
    cases = build_shortcut_cases(model, x, torch.zeros(n, dtype=torch.long), lesion, [str(i) for i in range(n)],
                                 get_shortcut("tag"), 1, torch.tensor([MARK_VALUE]), seed=0)
    assert len(cases.ids) == n
    return model, cases


def _bright_left(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``[N]``: mark pixels (above 1.5) outside ``removed``. By the classifier's construction the
    call flips only when fewer than MARK_PIXELS / 2 are left (and keeps them when at least that)."""
    return ((x[:, 0] > 1.5) & ~removed).flatten(1).sum(1)


@pytest.mark.parametrize("source", SOURCES)
def test_an_ok_necessary_region_holds_the_mark(source):
    """Whatever the source, a necessary region the checks call ok must remove the mark: nothing
    else small flips this call."""
    model, cases = _cases(needs_lesion=True, n=4, context=True)
    e = explain(model, cases.x, config=MedCAMConfig(necessary=source, **FAST), seed=0)
    assert e.two_sided and e.necessary_mask.shape == (4, 64, 64) and e.necessary_mask.dtype == torch.bool
    assert e.necessary_logits.shape == (4, 64, 64) and e.necessary_curve.shape == (4, len(MedCAMConfig().checks.area_grid))
    ok = torch.tensor([s == "ok" for s in e.necessary_status])
    assert (_bright_left(cases.x, e.necessary_mask)[ok] < MARK_PIXELS // 2).all()
    assert e.necessary_flipped[ok].all() and (e.necessary_random_pass[ok] <= MedCAMConfig().checks.random_bound).all()
    assert (e.necessary_new_label[ok] == 0).all()


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("source", ["occlusion", "occlusion+fit"])
def test_necessary_side_finds_a_mark_that_is_not_sufficient_alone(source, device):
    model, cases = _cases(needs_lesion=True, n=4, context=True)
    e = explain(model.to(device), cases.x.to(device), config=MedCAMConfig(necessary=source, **FAST), seed=0)
    assert e.necessary_status == ["ok"] * 4, e.necessary_reason
    assert (_bright_left(cases.x, e.necessary_mask) < MARK_PIXELS // 2).all()
    # the sufficient side cannot rest on the mark alone: some of the texture must be kept too
    for i in range(4):
        assert not (e.status[i] == "ok" and bool((e.mask[i] <= cases.gt[i]).all()))
    assert all(e.headline(i).startswith("Removing this region") and "to class 0" in e.headline(i) for i in range(4))


def test_both_sides_find_a_mark_that_suffices_alone():
    model, cases = _cases(needs_lesion=False, n=3)
    e = explain(model, cases.x, config=MedCAMConfig(necessary="occlusion+fit", **FAST), seed=0)
    assert e.status == ["ok"] * 3 and e.necessary_status == ["ok"] * 3, (e.reason, e.necessary_reason)
    assert (_bright_left(cases.x, e.necessary_mask) < MARK_PIXELS // 2).all()
    assert (_bright_left(cases.x, ~e.mask) >= MARK_PIXELS // 2).all()        # the kept region holds the mark
    rows = e.rows(["other", "marked"])
    assert rows[0]["necessary_new_class_name"] == "other" and rows[0]["necessary_status"] == "ok"
    assert "Removing this region" in rows[0]["headline"] and "keeps the call marked" in rows[0]["headline"]


def test_two_sided_default_shared_ranking_and_one_sided_option():
    model, cases = _cases(needs_lesion=False, n=2)
    both = explain(model, cases.x, config=MedCAMConfig(**FAST), seed=0)
    assert both.two_sided and MedCAMConfig().necessary in NECESSARY_SOURCES and len(both.necessary_status) == 2
    one = explain(model, cases.x, config=MedCAMConfig(necessary=None, **FAST), seed=0)
    assert torch.equal(one.mask, both.mask) and one.status == both.status     # the sufficient side is unchanged
    assert not one.two_sided and one.necessary_status == [] and "necessary_status" not in one.rows()[0]
    shared = explain(model, cases.x, config=MedCAMConfig(necessary="shared", **FAST), seed=0)
    assert torch.equal(shared.mask_logits, one.mask_logits) and torch.equal(shared.necessary_logits, one.mask_logits)
    assert torch.equal(shared.mask, one.mask) and shared.status == one.status


def test_two_sided_fields_survive_select_and_concat():
    model, cases = _cases(needs_lesion=False, n=3)
    e = explain(model, cases.x, config=MedCAMConfig(necessary="shared", **FAST), seed=0)
    back = Explanation.concat([e.select(2), e.select([0, 1])])
    assert torch.equal(back.necessary_mask, e.necessary_mask[[2, 0, 1]])
    assert back.necessary_status == [e.necessary_status[i] for i in (2, 0, 1)] and back.n_random == e.n_random


def test_necessary_status_rules_in_order():
    cfg = MedCAMConfig()
    assert necessary_status_of(True, False, 0.0, 0.05, cfg)[0] == "null_keeps_label"
    assert necessary_status_of(False, True, 0.0, 0.05, cfg)[0] == "not_flipped"
    assert necessary_status_of(True, True, 0.5, 0.05, cfg)[0] == "not_informative"
    assert necessary_status_of(True, True, 0.0, 0.95, cfg)[0] == "not_minimal"
    status, reason = necessary_status_of(True, True, 0.0625, 0.05, cfg, certified="blur_fine")
    assert status == "ok" and "blur_fine" in reason and "6%" in reason


def test_necessary_source_is_validated():
    assert set(SOURCES) | {"shared"} <= set(NECESSARY_SOURCES)
    with pytest.raises(ValueError, match="necessary-side source"):
        MedCAMConfig(necessary="occlusion_of_everything").validate()


def test_no_certified_fill_says_neither_side_can_show_evidence():
    """A classifier that calls class 1 on everything: no fill is certified on either side."""
    class Always(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * 0 + torch.tensor([0.0, 5.0])

    e = explain(Always(), torch.randn(1, 1, 32, 32), config=MedCAMConfig(necessary="shared", **FAST), seed=0)
    assert e.status == ["null_keeps_label"] and e.necessary_status == ["null_keeps_label"]
    assert e.headline(0).startswith("No evidence can be shown")


def test_report_shows_both_sides(tmp_path):
    """The panel draws the necessary region, the CLI table and the HTML carry its columns and the
    headline; a one-sided run keeps the old columns."""
    from medcam_fast.report import panel_png, panel_title, text_table, write_report

    model, cases = _cases(needs_lesion=False, n=2)
    e = explain(model, cases.x, config=MedCAMConfig(necessary="shared", **FAST), seed=0)
    rows = [{"name": f"img{i}", **r} for i, r in enumerate(e.rows(["other", "marked"]))]
    unit = (cases.x[0] / 2 + 0.5).clamp(0, 1)
    png = panel_png(tmp_path / "p.png", unit, rows[0], e.mask[0], unit, necessary_mask=e.necessary_mask[0])
    assert (tmp_path / "p.png").stat().st_size > 0 and png.endswith("p.png")
    title = panel_title(rows[0])
    assert "necessary side: " + rows[0]["necessary_status"] in title and rows[0]["headline"] in title.replace("\n", " ")
    table = text_table(rows)
    assert "necessary" in table.splitlines()[0] and "nec_random" in table.splitlines()[0]
    one = [{k: v for k, v in r.items() if not k.startswith("necessary_")} for r in rows]
    assert "necessary" not in text_table(one).splitlines()[0]
    html, _ = write_report(tmp_path / "rep", rows, [None, None], ["other", "marked"])
    page = open(html).read()
    assert "call without it" in page and rows[0]["headline"].split(";")[0] in page


def test_service_and_amortised_paths_carry_both_sides():
    """The service returns each request's two-sided Explanation: the direct call's on the batch
    it gathered."""
    from medcam_fast import Explainer
    from medcam_fast.medcam.service import ExplainerService

    model, cases = _cases(needs_lesion=False, n=2)
    explainer = Explainer(model, MedCAMConfig(necessary="shared", **FAST))
    with ExplainerService(explainer, max_batch=2, window=0.5) as service:
        futures = [service.submit(cases.x[i]) for i in range(2)]
        got = [f.result(timeout=120) for f in futures]
        batches = [b.ids for b in service.batches]
    ids = [f.request_id for f in futures]
    for batch in batches:
        rows = [ids.index(r) for r in batch]
        direct = explainer(cases.x[rows], seed=0)
        for j, i in enumerate(rows):
            assert got[i].two_sided and got[i].necessary_status == [direct.necessary_status[j]]
            assert torch.equal(got[i].necessary_mask[0], direct.necessary_mask[j])


def test_coarse_to_fine_occlusion_finds_the_mark_in_117_passes():
    from medcam_fast.medcam.necessary import coarse_to_fine_occlusion
    from medcam_fast.medcam.sufficiency import gaussian_blur

    model, cases = _cases(needs_lesion=True, n=3, context=True)
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return model(x)

    score = coarse_to_fine_occlusion(forward, cases.x, cases.call, gaussian_blur(cases.x, 3.2))
    assert score.shape == (3, 64, 64) and sum(calls) == 3 + 3 * (9 + 36 + 36 + 36)
    # the mark is the only small region whose removal lowers the margin: the map peaks within one
    # finest cell (2 px) of its ground truth
    top = score.flatten(1).argmax(1)
    near = torch.nn.functional.max_pool2d(cases.gt[:, None].float(), 5, 1, 2)[:, 0] > 0
    assert near.flatten(1)[torch.arange(3), top].all()

"""Leave-one-case-out: does a setting chosen on some cases transfer to another?

For each case k, the setting is chosen on the **val** cases of every other case (the mean over
those cases of each case's val score, so a large case does not outweigh a small one), then
scored on k's **test** cases. Beside it, the setting chosen on every case's val cases (the
"all-cases" default). A protocol that transfers keeps each case's left-out score near the
all-cases one. Tuning reads val scores only; test scores are only read for the chosen settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# the Med-CAM settings compared (MedCAMConfig overrides), in a fixed order: ties go to the first
SETTINGS: dict[str, dict] = {
    "preservation": {},
    "deletion": {"objective": "deletion"},
    "dual": {"objective": "dual"},
    "preservation, AM x5": {"fit": {"act": 1.0}},
    "preservation, area x0.5": {"priors": {"area_weight": 2.0}},
    "deletion, area x0.5": {"objective": "deletion", "priors": {"area_weight": 2.0}},
}

# the necessary side's sources compared (the sufficient side at the defaults), scored on that side
NECESSARY_SETTINGS: dict[str, dict] = {
    "necessary: occlusion": {"necessary": "occlusion"},
    "necessary: occlusion+fit": {"necessary": "occlusion+fit"},
    "necessary: fit": {"necessary": "fit"},
}


def _score(values: dict[str, float], cases) -> float:
    v = [values[c] for c in cases if c in values and not math.isnan(values[c])]
    return sum(v) / len(v) if v else float("nan")


def choose(val: dict[str, dict[str, float]], cases, tie: dict[str, dict[str, float]] | None = None) -> str:
    """The setting with the highest mean val score over ``cases`` (``val[setting][case]``); ties
    broken by ``tie`` (same layout, e.g. precision), then by the settings' order."""
    best, key = None, None
    for setting, scores in val.items():
        k = (_score(scores, cases), _score(tie[setting], cases) if tie else 0.0)
        k = tuple(-math.inf if math.isnan(v) else v for v in k)
        if key is None or k > key:
            best, key = setting, k
    if best is None:
        raise ValueError("no setting to choose from")
    return best


@dataclass
class LocoRow:
    case: str
    chosen: str              # chosen on the other cases' val
    test: float              # its score on this case's test cases
    all_cases: str           # chosen on every case's val
    all_cases_test: float    # its score on this case's test cases

    @property
    def gap(self) -> float:
        """Left-out minus all-cases score (points when the scores are shares x 100)."""
        return self.test - self.all_cases_test


def leave_one_case_out(val: dict[str, dict[str, float]], test: dict[str, dict[str, float]],
                       tie: dict[str, dict[str, float]] | None = None) -> list[LocoRow]:
    """One :class:`LocoRow` per case of ``val`` (``val[setting][case]``, ``test[setting][case]``):
    ``test`` needs an entry for every setting chosen."""
    cases = sorted({c for scores in val.values() for c in scores})
    overall = choose(val, cases, tie)
    rows = []
    for k in cases:
        s = choose(val, [c for c in cases if c != k], tie)
        for need in (s, overall):
            if k not in test.get(need, {}):
                raise ValueError(f"no test score of setting {need!r} on case {k!r}")
        rows.append(LocoRow(k, s, test[s][k], overall, test[overall][k]))
    return rows


def needed_test_runs(val: dict[str, dict[str, float]], tie=None) -> set[tuple[str, str]]:
    """``(setting, case)`` pairs whose test score :func:`leave_one_case_out` will read."""
    cases = sorted({c for scores in val.values() for c in scores})
    overall = choose(val, cases, tie)
    return {(s, k) for k in cases for s in (choose(val, [c for c in cases if c != k], tie), overall)}


__all__ = ["LocoRow", "NECESSARY_SETTINGS", "SETTINGS", "choose", "leave_one_case_out", "needed_test_runs"]

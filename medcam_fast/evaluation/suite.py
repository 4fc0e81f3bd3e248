"""The known-evidence suite: planted-shortcut cases across modalities, architectures and shortcut
kinds, each with its classifier, its val and test cases, and its oracle facts.

A case (:class:`CaseSpec`) is a recipe: a data set, a timm architecture at an input size, a
shortcut of :mod:`medcam_fast.data.shortcuts` planted on a share of one class's training images,
trained by ``benchmarks/train_classifier.py`` (``benchmarks/build_known_evidence.py`` trains it
and the same recipe without the shortcut, and writes the oracle facts into its card). Its
classifier lives in ``benchmarks/models/<name>.safetensors`` with the card ``<name>.json``.

Test cases come from the test split and val cases from the val split (disjoint images); both are
the images of other classes that the classifier calls correctly and the mark flips
(:func:`~medcam_fast.evaluation.cases.build_shortcut_cases`). Tuning reads val cases only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


from ..data.shortcuts import get_shortcut
from .cases import ShortcutCases, build_shortcut_cases
from .runner import EvalSet

CASES: dict[str, "CaseSpec"] = {}
SPLIT_SEEDS = {"test": 0, "val": 1}   # where the marks are drawn: one seeded draw per split


@dataclass(frozen=True)
class CaseSpec:
    """One known-evidence case's recipe. ``rate`` / ``other_rate``: the share of ``target``'s and of
    the other classes' training images that carry the mark; ``mask_share`` > 0: trained on
    randomly masked images (EVAL-X), else normally; ``tag_flag``: trained with ``--tag-class``
    (the brain_mri_tag classifier's own command)."""

    name: str
    dataset: str
    arch: str
    size: int
    shortcut: str
    target: str
    rate: float = 0.5
    other_rate: float = 0.0
    epochs: int = 30
    arch_args: str = ""
    balanced: bool = False
    mask_share: float = 0.0
    tag_flag: bool = False
    note: str = ""

    @property
    def normally_trained(self) -> bool:
        return self.mask_share == 0

    @property
    def clean_name(self) -> str:
        """The same recipe without the shortcut (its card holds the clean accuracy to compare with)."""
        return f"{self.name}_clean"

    def train_argv(self, data_root, out, with_shortcut: bool = True) -> list[str]:
        """``benchmarks/train_classifier.py`` arguments of this recipe (or its clean twin)."""
        argv = ["--dataset", self.dataset, "--data", str(data_root), "--model", self.arch, "--size", str(self.size),
                "--epochs", str(self.epochs), "--out", str(out)]
        if self.arch_args:
            argv += ["--arch-args", self.arch_args]
        if self.balanced:
            argv += ["--balanced"]
        if self.mask_share:
            argv += ["--mask-share", str(self.mask_share)]
        if with_shortcut and self.tag_flag:
            argv += ["--tag-class", self.target, "--tag-rate", str(self.rate), "--tag-other-rate", str(self.other_rate)]
        elif with_shortcut:
            argv += ["--shortcut", self.shortcut, "--shortcut-class", self.target, "--shortcut-rate", str(self.rate),
                     "--shortcut-other-rate", str(self.other_rate)]
        return argv

    def describe(self) -> str:
        trained = "normally" if self.normally_trained else f"on randomly masked images (share {self.mask_share})"
        return (f"{self.dataset}, timm {self.arch} {self.arch_args or ''} at {self.size}², trained from scratch "
                f"{trained}; {get_shortcut(self.shortcut).description}; on {self.rate:.0%} of {self.target} "
                f"training images and {self.other_rate:.0%} of the others").replace("  ", " ")


def register_case(spec: CaseSpec) -> CaseSpec:
    CASES[spec.name] = spec
    return spec


register_case(CaseSpec("brain_mri_tag_mobilenetv2_050", "brain_mri", "mobilenetv2_050", 64, "tag", "meningioma"))
register_case(CaseSpec("isic2018_ink_resnet10t", "isic2018", "resnet10t", 128, "ink_arc", "MEL", epochs=60))
register_case(CaseSpec("brain_mri_text_convnext_atto", "brain_mri", "convnext_atto", 64, "text", "meningioma"))
register_case(CaseSpec("brain_mri_text_vit", "brain_mri", "vit_tiny_patch16_224", 64, "text", "meningioma",
                       arch_args='{"img_size": 64, "patch_size": 8, "depth": 6}'))
# the tag benchmark's classifier (issue 15): trained on masked images, the defaults were tuned on its val cases
register_case(CaseSpec("brain_mri_tag_mobilenetv2", "brain_mri", "mobilenetv2_100", 64, "tag", "meningioma", rate=0.9,
                       other_rate=0.05, mask_share=0.3, tag_flag=True,
                       note="the brain_mri_tag benchmark's classifier, on which the defaults were tuned"))


def get_case(name: str) -> CaseSpec:
    if name not in CASES:
        raise ValueError(f"unknown known-evidence case {name!r}; available: {sorted(CASES)}")
    return CASES[name]


def load_case(spec: CaseSpec, weights_dir) -> tuple:
    """``(model, preprocess, class_names, card)`` of a case's classifier in ``weights_dir``."""
    from . import _load

    if not (Path(weights_dir) / f"{spec.name}.safetensors").is_file():
        raise ValueError(f"case {spec.name!r}: no classifier at {Path(weights_dir) / (spec.name + '.safetensors')}; "
                         "train it with benchmarks/build_known_evidence.py")
    model, prep, class_names, card = _load(spec.name, weights_dir)
    return model.eval(), prep, class_names, card


def split_cases(spec: CaseSpec, root, model, prep, class_names, split: str) -> ShortcutCases:
    """Every case of ``split`` (test or val): the split's images marked at the split's seeded places."""
    from . import load_split

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    x, lesion, ids, y = load_split(spec.dataset, root, split, prep, None)
    shortcut = get_shortcut(spec.shortcut)
    value = shortcut.value(x.shape[1], prep.mean, prep.std)
    return build_shortcut_cases(model, x, y, lesion, ids, shortcut, class_names.index(spec.target), value,
                                seed=SPLIT_SEEDS[split])


def subset(cases: ShortcutCases, n: int | None, seed: int = 0) -> ShortcutCases:
    """A seeded draw of ``n`` cases (all when ``n`` is None or larger), in their original order."""
    if n is None or n >= len(cases.ids):
        return cases
    return cases.select(sorted(random.Random(seed).sample(range(len(cases.ids)), n)))


def case_eval_set(spec: CaseSpec, root, model, prep, class_names, n_test: int | None, n_val: int | None,
                  seed: int = 0, pool_size: int = 16) -> tuple[EvalSet, ShortcutCases, ShortcutCases]:
    """The harness's :class:`EvalSet` of a case: ``n_test`` test cases (ground truth the mark, the
    lesion as second reference), ``n_val`` val cases for the CAM thresholds, and ``pool_size``
    clean val images as the (audit-only) reference pool. Also returns the test and val cases."""
    from . import load_split

    test = subset(split_cases(spec, root, model, prep, class_names, "test"), n_test, seed)
    val = subset(split_cases(spec, root, model, prep, class_names, "val"), n_val, seed)
    if not test.ids or not val.ids:
        raise ValueError(f"case {spec.name!r}: the mark flips no {'test' if not test.ids else 'val'} image")
    pool, _, _, _ = load_split(spec.dataset, root, "val", prep, pool_size, seed + 1)
    data = EvalSet(spec.name, test.x, test.ids, test.gt, pool, val.x, val.gt, gt_lesion=test.lesion)
    return data, test, val


def add_suite_arguments(ap, root: Path, out_name: str, n_val: int = 16) -> None:
    """The options the suite's scripts share (an ``argparse`` parser, the checkout ``root``):
    the data and models folders, ``--out`` (default ``benchmarks/results/<out_name>``), the cases,
    how many test and val cases, the seed and the threads."""
    ap.add_argument("--data", default=str(root.parent / "shared" / "data"), help="holds brain_mri/ and isic2018/")
    ap.add_argument("--models", default=str(root / "benchmarks" / "models"))
    ap.add_argument("--out", default=str(root / "benchmarks" / "results" / out_name))
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default every case")
    ap.add_argument("--n-test", type=int, default=40, help="test cases per case (a seeded draw)")
    ap.add_argument("--n-val", type=int, default=n_val, help="val cases per case (a seeded draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)


def read_card(spec: CaseSpec, weights_dir) -> dict:
    """A case classifier's card (JSON), with its ``known_evidence`` section when built."""
    path = Path(weights_dir) / f"{spec.name}.json"
    if not path.is_file():
        raise ValueError(f"case {spec.name!r}: no card at {path}")
    return json.loads(path.read_text())


__all__ = ["CASES", "CaseSpec", "SPLIT_SEEDS", "add_suite_arguments", "case_eval_set", "get_case", "load_case", "read_card",
           "register_case", "split_cases", "subset"]

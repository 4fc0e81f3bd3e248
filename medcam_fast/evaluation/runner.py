"""The evaluation harness: every method on the same images, scored the same way, resumable.

For each image and method it records decision metrics (kept, confidence change, area), curve
metrics (deletion, insertion, ROAD), localisation (hit, IoU, Dice, pointing game), the
sufficiency test of :mod:`medcam_fast.medcam.sufficiency` (sufficient, flipped when removed,
random_pass of blobs at the mask's area, a* and the evidence curve), and kept_robust as an audit
(pasted onto images of other labels; not part of any verdict). Records
are appended to ``records.jsonl`` as they finish, so an interrupted run loses nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import metrics
from ..baselines.perturbation import HARNESS_METHODS as PERTURBATION_METHODS
from ..medcam import Explainer, MedCAMConfig, paper_config, plain_config, sufficiency
from ..medcam.config import CheckConfig
from ..metrics.topk import top_k_mask
from ..models.fingerprint import classifier_fingerprint
from ..models.passes import PassCounter
from ..runstate import append_jsonl, atomic_write, check_manifest, read_jsonl
from .masking import blob_scores, fill
from .sufficiency import SWEEP, area_to_sufficiency, evidence_curve, kept_robust_of_masks, pick_backgrounds

ROAD_PERCENTILES = (10, 30, 50, 70, 90)
PATCHNET_METHODS = ("patchnet_raw", "patchnet_scaled", "patchnet_smooth")
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "ablationcam")
# masks reported beside every method: the ground truth itself (the oracle: is the known evidence
# sufficient?) and the trivial ones (Stalder et al. 2022), nothing kept and everything kept
CONTROL_METHODS = ("ground_truth", "all_zero", "all_one")
# Med-CAM rows: the per-image fits (TorchRay's three objectives as settings of one fit), and the
# amortised explainer (EvalOptions.explainer) alone or refined
MEDCAM_METHODS = ("medcam", "medcam_deletion", "medcam_dual", "medcam_plain", "medcam_reference",
                  "amortised", "amortised+refine")
# rows that are settings of the default fit (MedCAMConfig overrides): the other two objectives,
# compared on the sufficient side alone (the default row carries both sides)
MEDCAM_SETTINGS = {"medcam_deletion": {"objective": "deletion", "necessary": None},
                   "medcam_dual": {"objective": "dual", "necessary": None}}
# saliency maps scored from a map: the CAMs, PatchNet's own, the perturbation baselines
MAP_METHODS = CAM_METHODS + PATCHNET_METHODS + PERTURBATION_METHODS


@dataclass
class EvalSet:
    """Images to explain with their ids, ground-truth masks, and a counterfactual pool."""

    name: str
    x: torch.Tensor                 # [N,C,H,W] preprocessed
    ids: list[str]
    gt: torch.Tensor                # [N,H,W] bool lesion masks
    pool: torch.Tensor              # [P,C,H,W] reference images (another split) for backgrounds
    x_val: torch.Tensor | None = None   # [V,C,H,W] val images to tune CAM thresholds on
    gt_val: torch.Tensor | None = None
    gt_lesion: torch.Tensor | None = None  # [N,H,W] bool second reference when gt is planted evidence


@dataclass
class EvalOptions:
    methods: tuple[str, ...] = ("medcam",) + CAM_METHODS
    reference_images: int = 3       # reference mode is minutes per image: a few only
    batch: int = 16                 # images per Med-CAM call
    n_robust: int = CheckConfig.n_robust
    seed: int = 0
    medcam: MedCAMConfig = field(default_factory=MedCAMConfig)
    reference: MedCAMConfig = field(default_factory=paper_config)
    plain: MedCAMConfig = field(default_factory=plain_config)
    explainer: str | None = None    # the amortised explainer (.safetensors) of the amortised rows
    refine: int = 20                # fit steps of the "amortised+refine" row
    curve_metrics: bool = True      # deletion/insertion AUC, ROAD and the kept_robust audit (off: the
                                    # sufficiency test, localisation and the controls only)
    checks: str = "full"            # the tables' Med-CAM checks: every candidate under every fill (the
                                    # adaptive rule is measured against it: benchmarks/adaptive_checks_val.py)
    warm_up: bool = False           # one untimed, uncounted call per Med-CAM Explainer first (its trace)


def _load_done(path: Path) -> dict:
    """The records of ``records.jsonl`` by (method, id); a half-written last line is dropped and
    redone (:func:`~medcam_fast.runstate.read_jsonl`)."""
    return read_jsonl(path, lambda r: (r["method"], r["id"]))


def _f(v) -> float:
    v = float(v)
    return v if math.isfinite(v) else float("nan")


class Evaluation:
    """Runs methods on an :class:`EvalSet` for one classifier, appending records to ``out_dir``."""

    def __init__(self, model, data: EvalSet, out_dir, options: EvalOptions | None = None, progress=None,
                 judge=None):
        """``judge``: an EVAL-X-style judge (:func:`~medcam_fast.evaluation.judge.fit_judge`) that
        scores every mask beside the classifier (``judge_kept``), or None."""
        self.model, self.data, self.opt = model.eval(), data, options or EvalOptions()
        self.judge = judge
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out / "records.jsonl"
        self.fingerprint = classifier_fingerprint(self.model)
        check_manifest(self.out, self.manifest(), resume=True, has_records=self.records_path.is_file())
        self.done = _load_done(self.records_path)
        self.progress = progress
        with torch.no_grad():
            self.logits = self.model(data.x)
            self.pool_labels = self.model(data.pool).argmax(1)
        self.label = self.logits.argmax(1)
        self.backgrounds = pick_backgrounds(data.pool, self.pool_labels, self.label, self.opt.n_robust,
                                            self.opt.seed + 101)
        with torch.no_grad():
            blank = self.model(torch.full_like(data.x[:1], self.opt.medcam.baseline))
        self.null_label = int(blank.argmax(1))
        cfg = self.opt.medcam   # the one test, with Med-CAM's settings, for every method
        self.fills = sufficiency.certify(self.forward, data.x, self.label, cfg.fills, cfg.baseline,
                                         cfg.checks.certify_margin, 64, cfg.checks.mask_fills)
        self.need = sufficiency.required_margin(sufficiency.margins(self.logits, self.label), cfg.checks.keep_margin,
                                                cfg.checks.keep_share)

    def manifest(self) -> dict:
        """What decides this run's records: a resume with anything else is refused."""
        o = self.opt
        ids = hashlib.sha256("\n".join(map(str, self.data.ids)).encode()).hexdigest()[:16]
        return {"kind": "medcam_fast.evaluation/1", "classifier": self.fingerprint, "dataset": self.data.name,
                "ids": ids, "n": len(self.data.ids), "seed": o.seed, "batch": o.batch, "checks": o.checks,
                "n_robust": o.n_robust, "reference_images": o.reference_images, "refine": o.refine,
                "explainer": None if o.explainer is None else Path(o.explainer).name,
                "curve_metrics": o.curve_metrics, "medcam": o.medcam.to_dict(), "reference": o.reference.to_dict(),
                "plain": o.plain.to_dict()}

    def forward(self, x):
        with torch.no_grad():
            return self.model(x)

    def _append(self, records: list[dict]) -> None:
        append_jsonl(self.records_path, records)
        self.done.update({(r["method"], r["id"]): r for r in records})

    def _todo(self, method: str, limit: int | None = None) -> list[int]:
        idx = list(range(len(self.data.ids)))[:limit]
        return [i for i in idx if (method, self.data.ids[i]) not in self.done]

    # ------------------------------------------------------------------ scoring
    def _score(self, method, idx, saliency, mask, seconds, extra=None, own_mask_counts=False) -> list[dict]:
        """Records for images ``idx`` from their ranking map ``saliency`` [n,H,W] and binary mask."""
        x, gt, y = self.data.x[idx], self.data.gt[idx], self.label[idx]
        evidence = fill(x, mask, "baseline", self.opt.medcam.baseline)
        kept = metrics.decision_kept(self.forward, evidence, y)
        judged = self._judge_kept(evidence, y)
        change = metrics.confidence_change(self.forward, x, evidence, y)
        curves = self._curve_metrics(idx, saliency, mask) if self.opt.curve_metrics else {}
        cfg, fills, need = self.opt.medcam, self.fills.select(idx), self.need[idx]
        use = sufficiency.counted(fills)
        own = sufficiency.run_side(self.forward, x, y, mask[:, None], fills, "preservation")
        sufficient = sufficiency.preserved(own, use, need)[0][:, 0]
        removed = sufficiency.run_side(self.forward, x, y, mask[:, None], fills, "deletion")
        flipped = sufficiency.flipped(removed, use)[0][:, 0]
        ctl = sufficiency.controls(self.forward, x, y, mask, fills, need, cfg.checks.n_random, self.opt.seed, 64, use)
        grid_ok, curve = evidence_curve(self.forward, x, y, saliency, fills, need)
        to_suff = area_to_sufficiency(grid_ok)
        area = metrics.mask_area(mask)
        if own_mask_counts:
            # Med-CAM's evidence is its own binary mask: where that is sufficient, its area counts
            to_suff = torch.where(sufficient, torch.minimum(area, to_suff), to_suff)
        overlap = (mask & gt).flatten(1).sum(1).float()
        precision = overlap / mask.flatten(1).sum(1).float()          # NaN for an empty mask
        recall = overlap / gt.flatten(1).sum(1).float().clamp(min=1)
        # the ranking cut to its own smallest sufficient area (1.0 where none is)
        at_star = top_k_mask(saliency, to_suff.double())
        precision_star = (at_star & gt).flatten(1).sum(1).float() / at_star.flatten(1).sum(1).float()
        precision_gt_area = metrics.precision_at_gt_area(saliency, gt)
        blob = self._blob_control(idx, area)
        out = []
        for j, i in enumerate(idx):
            r = {
                "method": method, "id": self.data.ids[i], "label": int(y[j]), "area": _f(area[j]),
                "kept": bool(kept[j]), "prob_change": _f(change[j]),
                **{k: _f(v[j]) for k, v in curves.items()},
                "hit": _f(metrics.hit_rate(saliency[j:j + 1], gt[j:j + 1])[0]),
                "precision_at_gt_area": _f(precision_gt_area[j]),
                "iou": _f(metrics.iou(mask[j:j + 1], gt[j:j + 1])[0]),
                "dice": _f(metrics.dice(mask[j:j + 1], gt[j:j + 1])[0]),
                "pointing": _f(metrics.pointing_game(saliency[j:j + 1], gt[j:j + 1])[0]),
                "components": int(metrics.connected_components(mask[j:j + 1])[0]),
                "area_to_sufficiency": _f(to_suff[j]),
                "evidence_curve": [_f(v) for v in curve[j]], "seconds": seconds / len(idx),
                "sufficient": bool(sufficient[j]), "flipped_when_removed": bool(flipped[j]),
                "random_pass": _f(ctl.random_pass[j]), "shape_keeps_label": bool(ctl.shape_keeps[j]),
                "testable": bool(use[j].any()), "precision_at_a_star": _f(precision_star[j]),
                "null_keeps_label": self.null_label == int(y[j]),
                "degenerate": bool(area[j] < 0.005 or area[j] > 0.9),
                "precision": _f(precision[j]), "recall": _f(recall[j]),
                "judge_kept": None if judged is None else bool(judged[j]),
                **{k: (None if v is None else _f(v[j])) for k, v in blob.items()},
            }
            if self.data.gt_lesion is not None:
                les = self.data.gt_lesion[i:i + 1]
                r["lesion_hit"] = _f(metrics.hit_rate(saliency[j:j + 1], les)[0])
                r["lesion_iou"] = _f(metrics.iou(mask[j:j + 1], les)[0])
                r["lesion_precision_at_area"] = _f(metrics.precision_at_gt_area(saliency[j:j + 1], les)[0])
            if extra:
                r.update({k: v[j] for k, v in extra.items()})
            out.append(r)
        return out

    def _curve_metrics(self, idx, saliency, mask) -> dict:
        """Deletion and insertion AUC, ROAD and the kept_robust audit ``{name: [n]}``."""
        x, y = self.data.x[idx], self.label[idx]
        dele = metrics.deletion(self.forward, x, saliency, y, baseline=self.opt.medcam.baseline)
        ins = metrics.insertion(self.forward, x, saliency, y)
        # ROAD: 5 removal levels and a 1e-4 solver tolerance keep it to ~1 s per image at 128x128
        rd = metrics.road(self.forward, x, saliency, y, percentiles=ROAD_PERCENTILES, tol=1e-4,
                          generator=torch.Generator().manual_seed(self.opt.seed))
        road = rd.combined if rd.combined.dim() else rd.combined.expand(len(idx))
        own_robust = kept_robust_of_masks(self.forward, x, y, mask, self.backgrounds[idx])   # audit only
        return {"deletion_auc": dele.auc, "insertion_auc": ins.auc, "road": road, "kept_robust": own_robust}

    def _judge_kept(self, evidence, y):
        if self.judge is None:
            return None
        return metrics.decision_kept(self.judge, evidence, y)

    def _blob_control(self, idx, area) -> dict:
        """One seeded random blob per image at its own mask area, on the blank baseline: kept and
        judge_kept (the same draw whatever the batching; random_pass is the test's own control)."""
        size = tuple(self.data.x.shape[-2:])
        scores = torch.cat([blob_scores(1, size, torch.Generator().manual_seed(self.opt.seed * 100_003 + i))
                            for i in idx])
        masks = top_k_mask(scores, area.double())
        x, y = self.data.x[idx], self.label[idx]
        evidence = fill(x, masks, "baseline", self.opt.medcam.baseline)
        judged = self._judge_kept(evidence, y)
        return {"blob_kept": metrics.decision_kept(self.forward, evidence, y).float(),
                "blob_judge_kept": None if judged is None else judged.float()}

    # ------------------------------------------------------------------ methods
    def run_control(self, method: str) -> None:
        """A control mask of CONTROL_METHODS scored like any method, its map the mask itself."""
        if method not in CONTROL_METHODS:
            raise ValueError(f"unknown control {method!r}; use one of {CONTROL_METHODS}")
        todo = self._todo(method)
        h, w = self.data.x.shape[-2:]
        for s in range(0, len(todo), self.opt.batch):
            idx = todo[s:s + self.opt.batch]
            if method == "ground_truth":
                mask = self.data.gt[idx].bool()
            else:
                mask = torch.full((len(idx), h, w), method == "all_one", dtype=torch.bool)
            self._append(self._score(method, idx, mask.float(), mask, 0.0))
            if self.progress:
                self.progress(method, len(idx))

    def run_medcam(self, method: str = "medcam") -> None:
        """``medcam`` (fast defaults), ``medcam_plain`` (the straightforward "before" config),
        ``medcam_reference`` (the paper's procedure, on the first ``reference_images`` images), or the
        amortised explainer's one pass (``amortised``) and ``refine`` fit steps from it."""
        explainer = self.medcam_explainer(method)
        fast = method != "medcam_reference"
        todo = self._todo(method, None if fast else self.opt.reference_images)
        step = self.opt.batch if fast else 1
        if todo and self.opt.warm_up:
            explainer(self.data.x[todo[:1]], target=self.label[todo[:1]], seed=self.opt.seed)
        for s in range(0, len(todo), step):
            idx = todo[s:s + step]
            with PassCounter(self.model) as passes:
                t0 = time.perf_counter()
                res = explainer(self.data.x[idx], target=self.label[idx], seed=self.opt.seed)
                seconds = time.perf_counter() - t0
            extra = {"status": res.status, "mc_random_pass": [float(v) for v in res.random_pass],
                     "prob_null": [float(v) for v in res.prob_null], "steps": [int(v) for v in res.steps],
                     "mc_null_keeps_label": [bool(v) for v in res.null_keeps_label],
                     "passes": [passes.images / len(idx)] * len(idx)}
            if res.two_sided:
                extra.update(self._necessary_extra(res, idx))
            self._append(self._score(method, idx, res.mask_logits, res.mask, seconds, extra, own_mask_counts=True))
            if self.progress:
                self.progress(method, len(idx))

    def _necessary_extra(self, res, idx) -> dict:
        """The necessary side of Med-CAM's records: its status, area and random control, and its
        ranking and mask scored against the ground truth (and the lesion) like the main ones."""
        gt, ranking, mask = self.data.gt[idx], res.necessary_logits, res.necessary_mask
        overlap = (mask & gt).flatten(1).sum(1).float()
        out = {"necessary_status": list(res.necessary_status),
               "necessary_area": res.necessary_area.tolist(),
               "necessary_random_pass": [_f(v) for v in res.necessary_random_pass],
               "necessary_flipped": [bool(v) for v in res.necessary_flipped],
               "necessary_hit": metrics.hit_rate(ranking, gt).tolist(),
               "necessary_precision_at_gt_area": [_f(v) for v in metrics.precision_at_gt_area(ranking, gt)],
               "necessary_precision": [_f(v) for v in overlap / mask.flatten(1).sum(1).float()]}
        if self.data.gt_lesion is not None:
            out["necessary_lesion_hit"] = metrics.hit_rate(ranking, self.data.gt_lesion[idx]).tolist()
        return out

    def medcam_explainer(self, method: str) -> Explainer:
        """The :class:`Explainer` of one of :data:`MEDCAM_METHODS` in this run."""
        mode = "paper" if method == "medcam_reference" else "fast"
        amortised = method.startswith("amortised")
        if amortised and self.opt.explainer is None:
            raise ValueError(f"method {method!r} needs an amortised explainer (EvalOptions.explainer / --explainer)")
        cfg = {"medcam_plain": self.opt.plain, "medcam_reference": self.opt.reference}.get(method, self.opt.medcam)
        cfg = cfg.replace(checks=dict(batch_as_counterfactuals=False, n_robust=self.opt.n_robust, mode=self.opt.checks))
        cfg = cfg.replace(**MEDCAM_SETTINGS.get(method, {}))
        return Explainer(self.model, cfg, mode=mode, counterfactuals=self.data.pool,
                         amortised=self.opt.explainer if amortised else None,
                         refine=self.opt.refine if method == "amortised+refine" else 0)

    def map_fn(self, method: str):
        """``(x, y) -> [n,H,W]`` saliency of a map method: a CAM through grad-cam, a perturbation
        baseline (:mod:`medcam_fast.baselines.perturbation`, the blank at Med-CAM's baseline), or
        PatchNet's own (``patchnet_smooth``: shifted grids at offset p/4; its cost includes those
        backbone passes)."""
        if method in CAM_METHODS:
            from ..baselines.gradcam import cam_maps

            return lambda x, y: cam_maps(self.model, x, y, method=method)
        if method in PERTURBATION_METHODS:
            from ..baselines.perturbation import perturbation_maps

            return lambda x, y: perturbation_maps(self.model, x, y, method, self.opt.medcam.baseline)
        from ..baselines import patchnet_saliency as ps

        if method == "patchnet_smooth":
            offset = max(1, self.model.patch_size // 4)
            return lambda x, y: ps.shifted_patch_saliency(self.model, x, offset, target=y).saliency
        return lambda x, y: ps.patch_saliency(self.model, x, target=y, mode=method.split("_")[1])

    def thresholds(self, methods) -> dict[str, float]:
        """CheXlocalize-style: each map method's binarisation threshold maximising mean IoU on the val
        images (cached in ``thresholds.json`` under the classifier's fingerprint: another classifier
        writing into the same folder gets its own)."""
        path = self.out / "thresholds.json"
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if any(not isinstance(v, dict) for v in cache.values()):   # the old flat form: nobody's to reuse
            cache = {}
        found = cache.setdefault(self.fingerprint, {})
        missing = [m for m in methods if m not in found]
        if missing and self.data.x_val is not None:
            with torch.no_grad():
                yv = self.model(self.data.x_val).argmax(1)
            for method in missing:
                maps = self.map_fn(method)(self.data.x_val, yv)
                found[method] = float(metrics.tune_threshold(maps, self.data.gt_val))
            atomic_write(path, json.dumps(cache, indent=2))
        return found

    def run_map(self, method: str, threshold: float) -> None:
        """A saliency-map method (CAM or PatchNet), binarised at ``threshold`` for the mask metrics."""
        fn = self.map_fn(method)
        todo = self._todo(method)
        for s in range(0, len(todo), self.opt.batch):
            idx = todo[s:s + self.opt.batch]
            with PassCounter(self.model) as passes:
                t0 = time.perf_counter()
                maps = fn(self.data.x[idx], self.label[idx])
                seconds = time.perf_counter() - t0
            mask = metrics.binarise(maps, threshold)
            records = self._score(method, idx, maps, mask, seconds, {"threshold": [threshold] * len(idx),
                                                                     "passes": [passes.images / len(idx)] * len(idx)})
            self._cam_at_medcam_area(method, idx, maps, records)
            self._append(records)
            if self.progress:
                self.progress(method, len(idx))

    def _cam_at_medcam_area(self, method, idx, maps, records) -> None:
        """Whether the CAM's top-k pixels at Med-CAM's own area on the same image are sufficient."""
        areas = [self.done.get(("medcam", self.data.ids[i]), {}).get("area") for i in idx]
        if any(a is None for a in areas):
            return
        masks = top_k_mask(maps, torch.tensor(areas))
        fills = self.fills.select(idx)
        res = sufficiency.run_side(self.forward, self.data.x[idx], self.label[idx], masks[:, None], fills)
        ok = sufficiency.preserved(res, sufficiency.counted(fills), self.need[idx])[0][:, 0]
        for r, v in zip(records, ok):
            r["sufficient_at_medcam_area"] = bool(v)

    def run(self, methods=None) -> list[dict]:
        methods = methods or self.opt.methods
        for method in MEDCAM_METHODS:
            if method in methods:
                self.run_medcam(method)
        maps = [m for m in methods if m in MAP_METHODS]
        if maps:
            thresholds = self.thresholds(maps)
            for method in maps:
                self.run_map(method, thresholds.get(method, 0.5))
        for method in CONTROL_METHODS:
            if method in methods:
                self.run_control(method)
        return list(self.done.values())

    def options_dict(self) -> dict:
        d = asdict(self.opt)
        d["sweep_areas"] = list(SWEEP)
        return d

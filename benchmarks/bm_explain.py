"""Seconds per explanation and what they buy: fast mode against the paper-faithful
mode ("paper"), on brain_mri val images with classifiers trained on its train split (CPU-sized by default).

    pytest benchmarks/bm_explain.py --benchmark-json=benchmarks/results/json/explain_cpu.json
    python benchmarks/make_table.py explain benchmarks/results/json/explain_cpu.json > benchmarks/results/explain_cpu.md

Fast mode explains 8 val images one at a time, paper mode 3 of them (it takes minutes each).
Beside the time per image the table holds kept rate, the sufficiency test's share (certified fills
of each image, medcam_fast.medcam.sufficiency), mean random_pass, mean area and mean p(label | evidence).
"""
import time

import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig, paper_config

from bench_data import classifier, split_images

CLASSIFIERS = {64: "brain_mri_mobilenetv2_64", 128: "brain_mri_mobilenetv2"}
N_IMAGES = {"fast": 8, "paper": 3}


def _summary(results, seconds):
    kept = torch.cat([r.kept_on_baseline for r in results]).float()
    return {
        "n_images": len(kept), "seconds_per_image": seconds / len(kept), "kept_rate": float(kept.mean()),
        "sufficient": float(torch.cat([r.sufficient for r in results]).float().mean()),
        "random_pass": float(torch.cat([r.random_pass for r in results]).nanmean()),
        "mean_area": float(torch.cat([r.area for r in results]).mean()),
        "mean_prob_evidence": float(torch.cat([r.prob_evidence for r in results]).mean()),
        "mean_prob_input": float(torch.cat([r.prob_input for r in results]).mean()),
        "status_ok": sum(s == "ok" for r in results for s in r.status),
        "mean_steps": float(torch.cat([r.steps for r in results]).float().mean()),
    }


@pytest.mark.parametrize("mode", ["fast", "paper"])
@pytest.mark.parametrize("size", [64, 128])
def test_fast_vs_reference(benchmark, quick, size, mode):
    model, prep, _ = classifier(CLASSIFIERS[size])
    x, _, _, _ = split_images("brain_mri", "val", prep, 8 + 24, seed=1, with_masks=False)   # the same 8 as before
    images = x[:N_IMAGES[mode]]
    cfg = paper_config() if mode == "paper" else MedCAMConfig()
    if quick:
        images, cfg = images[:1], cfg.replace(steps=10, fit=dict(min_steps=1))
    explainer = Explainer(model, cfg, mode=mode)
    out = {}

    def run():
        t0 = time.perf_counter()
        out["results"] = [explainer(img) for img in images]
        out["seconds"] = time.perf_counter() - t0

    benchmark.group = f"explain brain_mri {size}x{size}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(kind="fast_vs_reference", mode=mode, size=size, model=CLASSIFIERS[size],
                                **_summary(out["results"], out["seconds"]))

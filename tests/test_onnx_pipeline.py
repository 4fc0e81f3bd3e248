"""The frozen, gradient-free passes of explain() through onnxruntime agree with torch."""
import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig, explain
from medcam_fast.onnx import OrtClassifier, export_classifier

from planted import make_planted, train_tiny_cnn

CFG = MedCAMConfig(steps=40, fit=dict(min_steps=20, check_every=10))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = train_tiny_cnn(seed=0)
    x, _, _ = make_planted(4, seed=31, positive_only=True)
    xr, yr, _ = make_planted(40, seed=32)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_classifier(model, x[:2], path)
    return model, x, xr[yr == 0][:10], OrtClassifier(path, intra_op_threads=1)


class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.slow
def test_ort_forward_matches_torch_path(setup):
    model, x, ref, ort = setup
    counting = _Counting(ort)
    a = explain(model, x, config=CFG, counterfactuals=ref, seed=1)
    b = explain(model, x, config=CFG, counterfactuals=ref, seed=1, forward=counting)
    assert counting.calls > 0  # the gradient-free passes really went through ORT
    assert torch.equal(a.soft_mask, b.soft_mask)  # the fit (gradient passes) is torch's in both
    assert torch.equal(a.label, b.label) and torch.equal(a.kept_on_baseline, b.kept_on_baseline)
    torch.testing.assert_close(a.prob_input, b.prob_input, atol=1e-4, rtol=0)
    # the same binary masks and figures: onnxruntime's logits differ from torch's by ~1e-6, and a
    # pick changed by such differences in none of 132 (image, seed) cases measured on the planted
    # task and brain_mri val (benchmarks/results/sufficiency_rule_val.md)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.prob_evidence, b.prob_evidence, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.kept_robust, b.kept_robust, atol=0, rtol=0, equal_nan=True)
    p_ort = ort(a.evidence).softmax(1).gather(1, a.label[:, None])[:, 0]
    torch.testing.assert_close(p_ort, a.prob_evidence, atol=1e-4, rtol=0)


def test_explainer_takes_forward(setup):
    model, x, ref, ort = setup
    res = Explainer(model, CFG, forward=ort, counterfactuals=ref)(x[:1])
    assert res.kept_on_baseline.shape == (1,) and res.status[0] in ("ok", "null_keeps_label", "not_minimal", "not_kept")

"""The whole pipeline on a GPU: explain end to end, the ONNX IO-binding forward inside it, and the
arch check on the real device. Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them."""
import statistics

import pytest
import torch

import medcam_fast
from medcam_fast import _ext, explain, ops
from medcam_fast.ops import naive

from planted import SQUARE, make_planted, train_tiny_cnn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def planted_cuda():
    model = train_tiny_cnn(seed=0).cuda()
    x, _, planted = make_planted(12, seed=11, positive_only=True)
    xr, yr, _ = make_planted(64, seed=9)
    return model, x, planted, xr[yr == 0][:16]


def _iou(a, b):
    return ((a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).float()).tolist()


def test_explain_end_to_end_on_cuda(planted_cuda):
    # default config on CUDA: bf16 autocast of the classifier pass, the CUDA kernels (or their
    # announced fallback), verification; the planted square must be found as on the CPU
    model, x, planted, ref = planted_cuda
    res = explain(model, x.cuda(), counterfactuals=ref.cuda())
    assert res.mask.device.type == "cpu" and res.mask.shape == (12, 64, 64)
    shape_area = SQUARE * SQUARE / 64 ** 2
    assert res.kept_on_baseline.float().mean() >= 0.9
    assert statistics.median(res.area.tolist()) <= 2 * shape_area
    assert statistics.median(_iou(res.mask, planted)) >= 0.5
    assert next(model.parameters()).device.type == "cuda"     # the model was not moved


def test_ort_io_binding_inside_explain(planted_cuda, tmp_path):
    from medcam_fast.onnx import OrtClassifier, export_classifier

    model, x, planted, ref = planted_cuda
    path = tmp_path / "planted.onnx"
    export_classifier(model.cpu(), x[:2], path)
    model.cuda()
    ort = OrtClassifier(path, providers="cuda")
    if ort.providers[0] != "CUDAExecutionProvider":
        pytest.fail(f"onnxruntime-gpu gave {ort.providers} on a CUDA machine")
    xc = x[:4].cuda()
    torch.testing.assert_close(ort(xc), model(xc), atol=1e-3, rtol=1e-3)   # bound CUDA memory in and out
    a = explain(model, xc, counterfactuals=ref.cuda(), seed=1)
    b = explain(model, xc, counterfactuals=ref.cuda(), seed=1, forward=ort)
    assert torch.equal(a.label, b.label) and torch.equal(a.soft_mask, b.soft_mask)
    assert (a.kept_on_baseline == b.kept_on_baseline).float().mean() >= 0.75


def test_arch_check_on_this_gpu(monkeypatch):
    info = medcam_fast.build_info()
    if not info["cuda_ops"]:
        pytest.fail(f"CUDA kernels were not built: {info['error']}")
    dev = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(dev)
    assert _ext.cuda_arch_runs(cap, info["cuda_arch_list"]), (cap, info["cuda_arch_list"])
    assert _ext.has_kernel(dev)
    # built for another arch only: the ops fall back to the naive twins, with a warning, and agree
    monkeypatch.setattr(_ext, "_state", {**_ext.state(), "cuda_arch_list": "5.0"})
    monkeypatch.setattr(_ext, "_cuda_ok", {})
    m = torch.rand(2, 1, 16, 16, device=dev)
    with pytest.warns(RuntimeWarning, match="naive PyTorch ops"):
        got = ops.mask_priors(m)
    torch.testing.assert_close(got, naive.mask_priors(m))

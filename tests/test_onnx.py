"""ONNX export (parity with torch, dynamic batch, user model untouched) and the onnxruntime classifier.

Runs on one thread (ORT intra-op 1, torch set to 1 for the module) and tiny models at 32 px; the dynamo exports
are done once per module.
"""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import onnx
import onnxruntime as ort
import onnxscript  # noqa: F401  (pinned in requirements.txt: fails, never skips)
import timm

from medcam_fast.onnx import (OnnxExportError, OnnxInputError, OnnxModelError, OnnxParityError,  # noqa: E402
                              OrtClassifier, export_classifier, resolve_providers)

ATOL = 1e-4
CPU = "CPUExecutionProvider"
CUDA_FIRST = "CUDAExecutionProvider"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class TinyCNN(nn.Module):
    """BatchNorm and dropout make train and eval mode differ, so an export in train mode would show."""

    def __init__(self, in_chans=3, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


class BakedBatch(TinyCNN):
    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.drop(x.reshape(2, 8, -1).mean(-1)).repeat(1, 2))


class LoopBatch(TinyCNN):
    """Fine in eager at any batch size, but a trace specialises its batch size (a Python loop over it)."""

    def forward(self, x):
        return torch.cat([super(LoopBatch, self).forward(x[i:i + 1]) for i in range(x.shape[0])])


class NotLogits(TinyCNN):
    def forward(self, x):
        return self.conv1(x)


class Drifting(TinyCNN):
    """Adds the call count: the traced constant differs from the torch reference calls, a genuine parity miss."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) + float(self.calls)


def _snapshot(model):
    return ({name: m.training for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_same(model, snap):
    training, grads, state = snap
    assert {name: m.training for name, m in model.named_modules()} == training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _torch_logits(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def _user_state(model):
    """A model as a user leaves it mid-training: train mode, one frozen submodule in eval, one frozen param."""
    model.train()
    first_norm = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    first_norm.eval()
    next(iter(model.parameters())).requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory):
    torch.manual_seed(0)
    model = _user_state(timm.create_model("test_efficientnet", pretrained=False, num_classes=3, in_chans=1))
    snap = _snapshot(model)
    path = tmp_path_factory.mktemp("onnx") / "timm.onnx"
    report = export_classifier(model, torch.randn(1, 1, 32, 32), path)
    return model, path, report, snap


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    torch.manual_seed(1)
    model = _user_state(TinyCNN())
    snap = _snapshot(model)
    path = tmp_path_factory.mktemp("onnx") / "sub" / "cnn.onnx"   # parent folder made by the export
    report = export_classifier(model, torch.randn(2, 3, 32, 32), path)
    return model, path, report, snap


@pytest.fixture(scope="module")
def cnn_clf(cnn_export):
    return OrtClassifier(cnn_export[1], providers="cpu", intra_op_threads=1)


# ------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("which", ["timm_export", "cnn_export"])
def test_export_checker_and_parity(request, which):
    model, path, report, _ = request.getfixturevalue(which)
    onnx.checker.check_model(str(path))
    assert report.ok and report.max_abs_diff <= ATOL
    assert report.exporter == "dynamo"
    assert report.path == str(path) and path.is_file()
    assert report.opset >= 17
    c = 1 if which == "timm_export" else 3
    assert report.input_shape == (None, c, 32, 32)
    assert report.batch_sizes_checked == (2, 1, 3)
    assert set(report.diffs) == {1, 2, 3} and max(report.diffs.values()) == report.max_abs_diff
    assert report.providers == [CPU]
    text = str(report)
    assert "OK" in text and "max abs diff" in text and "batch    1" in text and str(path) in text
    # the graph's batch axis is symbolic and named
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"


@pytest.mark.parametrize("which", ["timm_export", "cnn_export"])
def test_export_leaves_user_model_unchanged(request, which):
    model, _, _, snap = request.getfixturevalue(which)
    _assert_same(model, snap)
    assert model.training   # the user's train mode (the export ran in eval)


def test_export_restores_model_on_failure(tmp_path):
    model = _user_state(LoopBatch())
    snap = _snapshot(model)
    with pytest.raises(OnnxExportError, match="specialized it to be a constant"):
        export_classifier(model, torch.randn(2, 3, 16, 16), tmp_path / "loop.onnx")
    _assert_same(model, snap)


def test_legacy_exporter_baked_batch_caught_by_parity(tmp_path):
    # the legacy exporter declares the batch dynamic but unrolls the loop for 2 (which batch 1 survives, the empty
    # slice adding no row): the ORT run at batch 3 shows it
    with pytest.raises(OnnxExportError, match=r"returned \(2, 4\) at batch 3.*baked into the graph"):
        export_classifier(LoopBatch(), torch.randn(2, 3, 16, 16), tmp_path / "loop.onnx", exporter="legacy")


def test_legacy_exporter_parity(tmp_path):
    torch.manual_seed(2)
    report = export_classifier(TinyCNN(), torch.randn(3, 3, 16, 16), tmp_path / "l.onnx", exporter="legacy")
    assert report.ok and report.exporter == "legacy" and report.max_abs_diff <= ATOL
    assert report.batch_sizes_checked == (3, 1, 4)


def test_parity_miss_raises_or_reports(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(OnnxParityError, match="parity") as err:
        export_classifier(Drifting(), x, tmp_path / "d.onnx", exporter="legacy")
    assert not err.value.report.ok and err.value.report.max_abs_diff > 0.5
    report = export_classifier(Drifting(), x, tmp_path / "d2.onnx", exporter="legacy", strict=False)
    assert not report.ok and report.max_abs_diff > 0.5 and "FAIL" in str(report)


def test_export_refuses_bad_model_and_example(tmp_path):
    with pytest.raises(OnnxExportError, match=r"logits \[N,K\]"):
        export_classifier(NotLogits(), torch.randn(2, 3, 8, 8), tmp_path / "n.onnx")
    with pytest.raises(OnnxExportError, match=r"for input \(1, 3, 8, 8\) it returned \(2, 4\)"):
        export_classifier(BakedBatch(), torch.randn(2, 3, 8, 8), tmp_path / "n.onnx")
    with pytest.raises(OnnxExportError, match="float32"):
        export_classifier(TinyCNN(), torch.randn(2, 3, 8, 8, dtype=torch.float64), tmp_path / "n.onnx")
    with pytest.raises(OnnxExportError, match=r"\[N,C,H,W\]"):
        export_classifier(TinyCNN(), torch.randn(8, 8), tmp_path / "n.onnx")
    with pytest.raises(OnnxExportError, match="exporter"):
        export_classifier(TinyCNN(), torch.randn(2, 3, 8, 8), tmp_path / "n.onnx", exporter="nope")
    assert not (tmp_path / "n.onnx").exists()


# -------------------------------------------------------------------------------------------------- classifier
def test_classifier_matches_torch_timm(timm_export):
    model, path, _, _ = timm_export
    clf = OrtClassifier(path, providers="cpu", intra_op_threads=1)
    x = torch.randn(3, 1, 32, 32)
    got = clf(x)
    assert isinstance(got, torch.Tensor) and got.shape == (3, 3) and got.dtype == torch.float32
    assert got.device == x.device
    assert (got - _torch_logits(model, x)).abs().max().item() <= ATOL
    assert clf.input_shape == (None, 1, 32, 32) and clf.num_classes == 3


def test_dynamic_batch(cnn_export, cnn_clf):
    model = cnn_export[0]
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        got = cnn_clf(x)
        assert got.shape == (n, 4)
        assert (got - _torch_logits(model, x)).abs().max().item() <= ATOL


def test_classifier_details(cnn_clf):
    x = torch.randn(2, 3, 32, 32, requires_grad=True)[:, :, :, :]
    out = cnn_clf(x)
    assert not out.requires_grad
    xt = torch.randn(2, 3, 32, 32).transpose(2, 3)   # non-contiguous
    assert torch.allclose(cnn_clf(xt), cnn_clf(xt.contiguous()))
    empty = cnn_clf(torch.randn(0, 3, 32, 32))
    assert empty.shape == (0, 4)
    assert cnn_clf.forward is not None and "K=4" in repr(cnn_clf)


def test_providers_reported(cnn_export, cnn_clf):
    # `providers` is what onnxruntime gave, not what was asked: ask for CUDA first and check that
    # a machine without a GPU reports CPU only (and warns), a GPU machine CUDA first
    assert cnn_clf.providers == [CPU]
    gpu = torch.cuda.is_available() and CUDA_FIRST in ort.get_available_providers()
    if gpu:
        asked = OrtClassifier(cnn_export[1], providers="cuda", intra_op_threads=1)
        assert asked.providers[0] == CUDA_FIRST
    else:
        with pytest.warns(RuntimeWarning, match="onnxruntime gave"):
            asked = OrtClassifier(cnn_export[1], providers="cuda", intra_op_threads=1)
        assert asked.providers == [CPU]
    assert resolve_providers("cuda") == [CUDA_FIRST, CPU]
    assert resolve_providers("auto") == ([CUDA_FIRST, CPU] if gpu else [CPU])
    auto = OrtClassifier(cnn_export[1], intra_op_threads=1)
    assert auto.providers == ([CUDA_FIRST, CPU] if gpu else [CPU])


class _SpyBinding:
    """Wraps a real IOBinding and records its bind/synchronize calls."""

    def __init__(self, real, calls):
        self.real, self.calls = real, calls

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not name.startswith(("bind_", "synchronize")):
            return attr

        def record(*args):
            self.calls.append((name, args))
            return attr(*args)
        return record


class _SpySession:
    """Delegates to a real InferenceSession and records the IO-binding calls."""

    def __init__(self, session):
        self._session, self.calls = session, []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def io_binding(self):
        return _SpyBinding(self._session.io_binding(), self.calls)

    def run_with_iobinding(self, binding, *args):
        self.calls.append(("run_with_iobinding", ()))
        return self._session.run_with_iobinding(binding.real, *args)


def test_io_binding_path_on_cpu(cnn_export, cnn_clf):
    # The IO-binding path (CUDA's, here with CPU memory): the input's memory and a preallocated
    # output are bound, ORT writes into the output, and the logits equal the plain path's.
    clf = OrtClassifier(cnn_export[1], providers="cpu", intra_op_threads=1, io_binding=True)
    spy = _SpySession(clf.session)
    clf.session = spy
    x = torch.randn(3, 3, 32, 32)
    got = clf(x)
    names = [c[0] for c in spy.calls]
    assert names == ["bind_input", "bind_output", "run_with_iobinding", "synchronize_outputs"], names
    bind_in, bind_out = spy.calls[0][1], spy.calls[1][1]
    assert bind_in[1:4] == ("cpu", 0, np.float32) and bind_in[4] == [3, 3, 32, 32]
    assert bind_out[4] == [3, 4] and bind_out[5] == got.data_ptr()   # ORT wrote into the returned tensor
    torch.testing.assert_close(got, cnn_clf(x), atol=1e-6, rtol=0)
    assert OrtClassifier(cnn_export[1], providers="cpu", io_binding=False)(x).shape == (3, 4)


def test_thread_safety(cnn_export, cnn_clf):
    model = cnn_export[0]
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2 + i, 3, 32, 32, generator=gen) for i in range(4)]
    refs = [_torch_logits(model, x) for x in xs]
    errors, barrier = [], threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            for _ in range(10):
                got = cnn_clf(xs[i])
                if got.shape != refs[i].shape or (got - refs[i]).abs().max().item() > ATOL:
                    errors.append((i, got.shape))
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ----------------------------------------------------------------------------------------------------- bad input
def test_missing_and_corrupt_file(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(OnnxModelError, match="nowhere.onnx"):
        OrtClassifier(missing)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(OnnxModelError, match="corrupt.onnx"):
        OrtClassifier(bad, providers="cpu")
    assert issubclass(OnnxModelError, ValueError)


def test_wrong_inputs(cnn_clf):
    with pytest.raises(OnnxInputError, match="channels must be 3"):
        cnn_clf(torch.randn(2, 1, 32, 32))
    with pytest.raises(OnnxInputError, match="height must be 32"):
        cnn_clf(torch.randn(2, 3, 16, 32))
    with pytest.raises(OnnxInputError, match="width must be 32"):
        cnn_clf(torch.randn(2, 3, 32, 31))
    with pytest.raises(OnnxInputError, match=r"x\[None\]"):
        cnn_clf(torch.randn(3, 32, 32))
    with pytest.raises(OnnxInputError, match="float32"):
        cnn_clf(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(OnnxInputError, match="torch.Tensor"):
        cnn_clf(np.zeros((2, 3, 32, 32), np.float32))
    assert issubclass(OnnxInputError, ValueError)


def test_fixed_batch_model_refused(tmp_path):
    torch.manual_seed(4)
    path = tmp_path / "fixed.onnx"
    report = export_classifier(TinyCNN(), torch.randn(2, 3, 16, 16), path, dynamic_batch=False)
    assert report.ok and report.input_shape == (2, 3, 16, 16) and report.batch_sizes_checked == (2,)
    with pytest.raises(OnnxModelError, match="batch axis is fixed at 2.*dynamic_batch=True"):
        OrtClassifier(path, providers="cpu", intra_op_threads=1)


def _save_graph(path, in_shape, out_shape, op="Identity", extra_inputs=()):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, in_shape) for n in extra_inputs]
    nodes = [helper.make_node(op, ["input"], ["out"])]
    if op == "Flatten":
        nodes = [helper.make_node("Flatten", ["input"], ["out"], axis=1)]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                  out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_non_logits_model_refused(tmp_path):
    path = _save_graph(tmp_path / "image_out.onnx", ["N", 3, 8, 8], ["N", 3, 8, 8])
    with pytest.raises(OnnxModelError, match=r"logits \[N,K\]"):
        OrtClassifier(path, providers="cpu")
    two = _save_graph(tmp_path / "two_in.onnx", ["N", 3, 8, 8], ["N", 3, 8, 8], extra_inputs=["other"])
    with pytest.raises(OnnxModelError, match="one input"):
        OrtClassifier(two, providers="cpu")
    baked = _save_graph(tmp_path / "baked_out.onnx", ["N", 3, 2, 2], [2, 12], op="Flatten")
    with pytest.raises(OnnxModelError, match="output batch axis is fixed"):
        OrtClassifier(baked, providers="cpu")


def test_symbolic_num_classes_learnt_on_first_call(tmp_path):
    path = _save_graph(tmp_path / "flat.onnx", ["N", 3, "H", "W"], ["N", "K"], op="Flatten")
    clf = OrtClassifier(path, providers="cpu", intra_op_threads=1)
    assert clf.num_classes is None and clf.input_shape == (None, 3, None, None)
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(clf(x), x.reshape(2, -1)) and clf.num_classes == 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_io_binding(cnn_export):
    model, path = cnn_export[0], cnn_export[1]
    clf = OrtClassifier(path, providers="auto")
    if clf.providers[0] != CUDA_FIRST:
        pytest.skip(f"onnxruntime gave {clf.providers}")
    x = torch.randn(5, 3, 32, 32, device="cuda")
    got = clf(x)
    assert got.device == x.device and got.shape == (5, 4)
    ref = _torch_logits(model, x.cpu())
    assert (got.cpu() - ref).abs().max().item() <= 1e-3   # CUDA conv (TF32 allowed) against CPU fp32
    assert clf(x.cpu()).device.type == "cpu"

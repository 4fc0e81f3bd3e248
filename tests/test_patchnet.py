"""PatchNet (MedicalPatchNet) and its patch saliency: exact aggregation, shapes, costs, planted evidence."""
import io
import math

import pytest
import torch
from torch import nn

from medcam_fast.baselines.patchnet_saliency import (SaliencyCost, patch_saliency, raw_patch_saliency,
                                                     scaled_patch_saliency, shift_offsets,
                                                     shifted_patch_saliency)
from medcam_fast.patchnet import PatchNet


class MeanIntensity(nn.Module):
    """Fixed backbone: class 0 logit = mean intensity of the patch, class 1 logit = 0.1 - that."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, 0.1 - m], dim=1)


def tiny_cnn(in_chans=1, k=3):
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))


def seeded(module, seed=0):
    torch.manual_seed(seed)
    for prm in module.parameters():
        nn.init.normal_(prm, std=0.5)
    return module


@pytest.fixture
def cnn_net():
    torch.manual_seed(0)
    net = PatchNet(seeded(tiny_cnn(1, 3)), 8, 3, 1).double().eval()
    net.backbone[1].running_mean.normal_()  # non-trivial eval BatchNorm
    net.backbone[1].running_var.uniform_(0.5, 2.0)
    return net


def planted(n=2, c=1, size=32, p=8, cell=(1, 2), value=1.0):
    x = torch.zeros(n, c, size, size, dtype=torch.float64)
    i, j = cell
    x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = value
    return x


# --- the model -----------------------------------------------------------------------------------------

def test_image_logits_are_exact_mean_of_patch_logits(cnn_net):
    x = torch.randn(3, 1, 32, 24, dtype=torch.float64)
    pl = cnn_net.patch_logits(x)
    assert pl.shape == (3, 3, 4, 3)
    assert torch.equal(cnn_net(x), pl.mean(dim=(2, 3)))
    # patch (i, j) of image b is the backbone applied to that crop alone (checks the patch order) ...
    for b in range(3):
        for i in range(4):
            for j in range(3):
                alone = cnn_net.backbone(x[b:b + 1, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8])[0]
                torch.testing.assert_close(pl[b, :, i, j], alone, atol=1e-12, rtol=0)
    # ... and the image logit is their plain mean, computed independently
    manual = torch.stack([sum(cnn_net.backbone(x[b:b + 1, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8])[0]
                              for i in range(4) for j in range(3)) / 12 for b in range(3)])
    torch.testing.assert_close(cnn_net(x), manual, atol=1e-12, rtol=0)


def test_one_backbone_pass_with_all_patches_and_hooks(cnn_net):
    seen = []
    h1 = cnn_net.backbone.register_forward_hook(lambda m, i, o: seen.append(("backbone", tuple(i[0].shape))))
    h2 = cnn_net.backbone[0].register_forward_hook(lambda m, i, o: seen.append(("conv", tuple(o.shape))))
    h3 = cnn_net.register_forward_hook(lambda m, i, o: seen.append(("model", tuple(o.shape))))
    with torch.no_grad():
        y = cnn_net(torch.randn(2, 1, 16, 32, dtype=torch.float64))
    for h in (h1, h2, h3):
        h.remove()
    assert not y.requires_grad and y.shape == (2, 3)
    assert seen == [("conv", (16, 4, 8, 8)), ("backbone", (16, 1, 8, 8)), ("model", (2, 3))]


def test_batch_inference_matches_single_images(cnn_net):
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        batch = cnn_net(x)
        single = torch.cat([cnn_net(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, atol=1e-12, rtol=0)


def test_trace_export_and_onnx(cnn_net, recwarn):
    net = cnn_net.float()
    x, x3 = torch.randn(2, 1, 16, 24), torch.randn(3, 1, 16, 24)
    with torch.no_grad():
        ref, ref3 = net(x), net(x3)
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), ref)
        torch.testing.assert_close(traced(x3), ref3)  # the batch size stays free in the trace
        assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]
        torch.testing.assert_close(torch.export.export(net, (x,)).module()(x), ref)
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (pinned in requirements.txt: fails, never skips)
    buf = io.BytesIO()
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["logits"], dynamo=False)  # TorchScript
    models = [buf.getvalue(), torch.onnx.export(net, (x,), dynamo=True).model_proto.SerializeToString()]
    for model in models:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=1e-5)


def test_timm_backbone_by_name():
    import timm  # noqa: F401  (pinned in requirements.txt: fails, never skips)
    net = PatchNet("resnet10t", 16, 3, 1).eval()
    net.pretrained_cfg = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)}  # as zoo.cards does
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        assert net(x).shape == (2, 3) and net.patch_logits(x).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("shape, match", [
    ((1, 1, 30, 32), r"30x32.*patch size 8"),
    ((1, 1, 32, 20), r"32x20.*patch size 8"),
    ((1, 3, 32, 32), "channels"),
    ((1, 32, 32), "4-d"),
    ((2, 1, 1, 32, 32), "4-d"),
])
def test_bad_input_raises(cnn_net, shape, match):
    x = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        cnn_net(x)
    with pytest.raises(ValueError, match=match):
        raw_patch_saliency(cnn_net, x)
    with pytest.raises(ValueError, match=match):
        shifted_patch_saliency(cnn_net, x, 4)


def test_bad_arguments_raise(cnn_net):
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="divide"):
        shifted_patch_saliency(cnn_net, x, 3)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError):
            shifted_patch_saliency(cnn_net, x, bad)
    with pytest.raises(ValueError, match="batch_size"):
        shifted_patch_saliency(cnn_net, x, 4, batch_size=0)
    with pytest.raises(ValueError, match="target"):
        raw_patch_saliency(cnn_net, x, target=3)
    with pytest.raises(ValueError, match="mode"):
        patch_saliency(cnn_net, x, mode="sigmoid")
    with pytest.raises(ValueError):
        PatchNet(MeanIntensity(), 0, 2, 1)
    with pytest.raises(ValueError, match=r"\[B, 5\]"):  # backbone output does not match num_classes
        PatchNet(MeanIntensity(), 8, 5, 1)(x)


# --- saliency ----------------------------------------------------------------------------------------

def test_raw_and_scaled_definitions(cnn_net):
    x = torch.randn(3, 1, 16, 24, dtype=torch.float64)
    pl = cnn_net.patch_logits(x)
    tgt = cnn_net(x).argmax(1)
    raw = raw_patch_saliency(cnn_net, x)
    assert raw.shape == (3, 16, 24)
    for b in range(3):
        for i in range(2):
            for j in range(3):
                assert torch.all(raw[b, 8 * i:8 * i + 8, 8 * j:8 * j + 8] == pl[b, tgt[b], i, j])
    # the mean of the raw map is the image logit of the target
    torch.testing.assert_close(raw.mean(dim=(1, 2)), cnn_net(x)[torch.arange(3), tgt], atol=1e-12, rtol=0)
    prob = torch.softmax(cnn_net(x), 1)[torch.arange(3), tgt]
    torch.testing.assert_close(scaled_patch_saliency(cnn_net, x), raw * prob[:, None, None], atol=1e-12, rtol=0)
    # explicit targets: an int for all images, or one per image
    t = torch.tensor([2, 0, 1])
    r2 = raw_patch_saliency(cnn_net, x, target=t)
    assert torch.all(r2[1, :8, :8] == pl[1, 0, 0, 0]) and torch.all(r2[0, :8, :8] == pl[0, 2, 0, 0])
    assert torch.equal(raw_patch_saliency(cnn_net, x, target=1), raw_patch_saliency(cnn_net, x, target=[1, 1, 1]))
    # scaled by the probability of the requested class, not of the predicted one
    p_t = torch.softmax(cnn_net(x), 1)[torch.arange(3), t]
    torch.testing.assert_close(scaled_patch_saliency(cnn_net, x, target=t), r2 * p_t[:, None, None],
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["raw", "scaled"])
def test_offset_equal_patch_size_is_direct_prediction(cnn_net, mode):
    x = torch.randn(2, 1, 24, 16, dtype=torch.float64)
    direct = patch_saliency(cnn_net, x, mode=mode)
    sal, cost = shifted_patch_saliency(cnn_net, x, 8, mode=mode)
    assert torch.equal(sal, direct)
    assert (cost.copies, cost.patch_evaluations, cost.backbone_passes) == (1, 12, 1)
    sal5, cost5 = shifted_patch_saliency(cnn_net, x, 8, mode=mode, batch_size=5)  # 12 patches in 3 calls
    torch.testing.assert_close(sal5, direct, atol=1e-12, rtol=0)
    assert cost5.backbone_passes == 3


@pytest.mark.parametrize("p, o, size", [(8, 4, 32), (8, 2, 16), (4, 1, 16), (6, 2, 18)])
def test_shifted_shapes_and_costs(p, o, size):
    torch.manual_seed(1)
    net = PatchNet(seeded(tiny_cnn(2, 3)), p, 3, 2).double().eval()
    n = 3
    x = torch.randn(n, 2, size, size + p, dtype=torch.float64)
    patches = (size // p) * (size // p + 1)
    for bs in (7, 10_000):
        sal, cost = shifted_patch_saliency(net, x, o, batch_size=bs)
        assert sal.shape == (n, size, size + p) and sal.dtype == torch.float64
        assert isinstance(cost, SaliencyCost) and cost.seconds >= 0
        assert cost.copies == (p // o) ** 2 and cost.patches_per_copy == patches
        assert cost.patch_evaluations == (p // o) ** 2 * n * patches
        assert cost.backbone_passes == math.ceil(cost.patch_evaluations / bs)
    # the backbone really saw that many patches
    seen = []
    h = net.backbone.register_forward_hook(lambda m, i, out: seen.append(i[0].shape[0]))
    shifted_patch_saliency(net, x, o, batch_size=7)
    h.remove()
    assert sum(seen) == cost.patch_evaluations and max(seen) <= 7 and len(seen) == math.ceil(sum(seen) / 7)


def naive_shifted(net, x, o, mode, tgt=None):
    """Reference: one zero-padded copy at a time through PatchNet, each map shifted back, mean over the
    copies that contain each pixel; default target = class predicted for the unshifted image."""
    n, _, h, w = x.shape
    p = net.patch_size
    tgt = net(x).argmax(1) if tgt is None else tgt
    acc = torch.zeros(n, h, w, dtype=x.dtype)
    cnt = torch.zeros(h, w, dtype=x.dtype)
    for dy in shift_offsets(p, o):
        for dx in shift_offsets(p, o):
            copy = torch.zeros_like(x)
            for u in range(h):
                for v in range(w):
                    if 0 <= u + dy < h and 0 <= v + dx < w:
                        copy[..., u, v] = x[..., u + dy, v + dx]
            m = patch_saliency(net, copy, target=tgt, mode=mode)
            for u in range(h):
                for v in range(w):
                    if 0 <= u - dy < h and 0 <= v - dx < w:
                        acc[:, u, v] += m[:, u - dy, v - dx]
                        cnt[u, v] += 1
    return acc / cnt


@pytest.mark.parametrize("mode", ["raw", "scaled"])
def test_shifted_matches_naive_reference(cnn_net, mode):
    x = torch.randn(2, 1, 16, 24, dtype=torch.float64)
    sal, _ = shifted_patch_saliency(cnn_net, x, 2, mode=mode, batch_size=13)
    torch.testing.assert_close(sal, naive_shifted(cnn_net, x, 2, mode), atol=1e-12, rtol=0)
    t = (cnn_net(x).argmax(1) + 1) % 3  # a class that is not the predicted one
    sal_t, _ = shifted_patch_saliency(cnn_net, x, 4, target=t, mode=mode)
    torch.testing.assert_close(sal_t, naive_shifted(cnn_net, x, 4, mode, t), atol=1e-12, rtol=0)


def test_shift_offsets():
    assert shift_offsets(8, 8) == [0]
    assert shift_offsets(8, 2) == [-4, -2, 0, 2]
    assert shift_offsets(6, 2) == [-2, 0, 2]


def test_delta_with_offset_one_is_a_tent():
    """Mean-intensity backbone, one bright pixel, o = 1: pixel u shares a patch with the bright pixel q in
    a fraction (1 - |u-q|/p) of the shifts per axis, so far from the borders the map is a separable tent."""
    p = 4
    net = PatchNet(MeanIntensity(), p, 2, 1)
    x = torch.zeros(1, 1, 24, 24, dtype=torch.float64)
    q = (11, 13)
    x[0, 0, q[0], q[1]] = 1.0
    sal, cost = shifted_patch_saliency(net, x, 1, target=0)
    assert cost.copies == 16
    d = torch.arange(24, dtype=torch.float64)
    ty = (1 - (d - q[0]).abs() / p).clamp(min=0)
    tx = (1 - (d - q[1]).abs() / p).clamp(min=0)
    torch.testing.assert_close(sal[0], ty[:, None] * tx[None, :] / p ** 2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell", [(1, 2), (0, 0), (3, 3)])
def test_planted_evidence_peaks_on_its_patch(cell):
    """Only one patch is bright; the fixed backbone scores class 0 by mean intensity, so the class-0 maps
    must peak inside that patch (interior and corner cells) for raw, scaled and smoothed saliency."""
    p = 8
    net = PatchNet(MeanIntensity(), p, 2, 1)
    x = planted(n=2, size=32, p=p, cell=cell)
    x[1] += 0.05 * torch.rand(1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.all(net(x).argmax(1) == 0)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[cell[0] * p:(cell[0] + 1) * p, cell[1] * p:(cell[1] + 1) * p] = True
    maps = {"raw": raw_patch_saliency(net, x), "scaled": scaled_patch_saliency(net, x)}
    for o in (4, 2, 1):
        for mode in ("raw", "scaled"):
            maps[f"{mode} o={o}"] = shifted_patch_saliency(net, x, o, mode=mode).saliency
    for name, m in maps.items():
        for b in range(2):
            flat = m[b].flatten()
            assert inside.flatten()[flat.argmax()], (name, b)
            assert m[b][inside].max() > m[b][~inside].max(), (name, b)

"""CAM baselines through grad-cam: methods, automatic target layers, the model left untouched, a planted
answer, and cutting maps to an area."""
import pytest
import torch
from torch import nn

import pytorch_grad_cam  # noqa: F401  (pinned in requirements.txt: fails, never skips)
import timm
import torchvision

from medcam_fast.baselines import gradcam as gc  # noqa: E402
from medcam_fast.baselines.gradcam import (available_methods, cam_maps, default_target_layers,  # noqa: E402
                                           get_method, reshape_transform_for, top_k_mask)
from medcam_fast.patchnet import PatchNet  # noqa: E402

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "ablationcam"]


# --- helpers ---------------------------------------------------------------------------------------------

def hook_count(model: nn.Module) -> int:
    """Forward, forward-pre, backward and backward-pre (full backward) hooks on every module, plus
    torch's global module hooks."""
    from torch.nn.modules import module as M

    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(m._backward_pre_hooks) for m in model.modules())
    return n + sum(len(getattr(M, g)) for g in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                               "_global_backward_hooks", "_global_backward_pre_hooks"))


def snapshot(model: nn.Module) -> dict:
    return {
        "modules": [(n, m) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hook_count(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert [(n, id(m)) for n, m in after["modules"]] == [(n, id(m)) for n, m in before["modules"]]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["hooks"] == before["hooks"]


def small_cnn(k=3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, k))


def tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3, **kw)


def check_maps(out, n, h, w):
    assert out.shape == (n, h, w) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


# --- the registry ----------------------------------------------------------------------------------------

def test_methods_are_grad_cam_classes():
    import pytorch_grad_cam as pgc

    assert available_methods() == sorted(METHODS)
    expected = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
                "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "ablationcam": pgc.AblationCAM}
    for name, cls in expected.items():
        assert get_method(name) is cls
    assert get_method("GradCAM") is pgc.GradCAM  # case-insensitive
    with pytest.raises(ValueError, match="unknown CAM method"):
        get_method("scorecam")


# --- every method on a timm and a torchvision model --------------------------------------------------------

@pytest.fixture(scope="module")
def timm_resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()


@pytest.fixture(scope="module")
def tv_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=3).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["timm_resnet", "tv_resnet"])
def test_each_method_runs(method, family, request):
    model = request.getfixturevalue(family)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)  # layer4 is 2x2 at 64 px
    before = snapshot(model)
    out = cam_maps(model, x, torch.tensor([0, 2]), method, batch_size=64)
    check_maps(out, 2, 64, 64)
    assert out.device == x.device
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_vit(method):
    model = tiny_vit().eval()
    out = cam_maps(model, torch.randn(2, 3, 64, 64), torch.tensor([1, 0]), method)
    check_maps(out, 2, 64, 64)
    assert (out.flatten(1).amax(1) > 0.99).all()  # a 4x4 token grid gives a non-constant map
    assert hook_count(model) == 0


def test_batches_match_one_call(timm_resnet):
    torch.manual_seed(2)
    x, y = torch.randn(5, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1])
    one = cam_maps(timm_resnet, x, y, "gradcam", batch_size=32)
    chunked = cam_maps(timm_resnet, x, y, "gradcam", batch_size=2)
    torch.testing.assert_close(one, chunked, atol=1e-5, rtol=0)
    assert one.flatten(1).amax(1).gt(0).any()


def test_works_under_no_grad_and_inference_mode(timm_resnet):
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    ref = cam_maps(timm_resnet, x, y, "gradcam")
    with torch.no_grad():
        torch.testing.assert_close(cam_maps(timm_resnet, x, y, "gradcam"), ref)
    with torch.inference_mode():
        torch.testing.assert_close(cam_maps(timm_resnet, x.clone(), y, "gradcam"), ref)


# --- automatic target layers ----------------------------------------------------------------------------

def _families():
    tvm = torchvision.models
    t = lambda name, **kw: timm.create_model(name, pretrained=False, num_classes=3, **kw)  # noqa: E731
    return [
        ("timm-resnet", lambda: t("resnet10t"), "layer4.0", lambda m: m.layer4[-1]),
        ("timm-mobilenetv2", lambda: t("mobilenetv2_035"), "bn2", lambda m: m.bn2),
        ("timm-efficientnet", lambda: t("efficientnet_b0"), "bn2", lambda m: m.bn2),
        ("timm-convnext", lambda: t("convnext_atto"), "stages.3", lambda m: m.stages[-1]),
        ("timm-vit", tiny_vit, "blocks.1.norm1", lambda m: m.blocks[-1].norm1),
        ("tv-resnet", lambda: tvm.resnet18(weights=None, num_classes=3), "layer4.1", lambda m: m.layer4[-1]),
        ("tv-mobilenetv2", lambda: tvm.mobilenet_v2(weights=None, num_classes=3, width_mult=0.35),
         "features.18", lambda m: m.features[-1]),
        ("tv-efficientnet", lambda: tvm.efficientnet_b0(weights=None, num_classes=3), "features.8",
         lambda m: m.features[-1]),
        ("tv-convnext", lambda: tvm.convnext_tiny(weights=None, num_classes=3), "features.7",
         lambda m: m.features[-1]),
        ("patchnet", lambda: PatchNet("resnet10t", 32, 3), "backbone.layer4.0", lambda m: m.backbone.layer4[-1]),
        ("unknown", small_cnn, "3", lambda m: m[3]),
    ]


@pytest.mark.parametrize("family,make,name,get", _families(), ids=[f[0] for f in _families()])
def test_default_target_layers(family, make, name, get):
    torch.manual_seed(0)
    model = make().eval()
    assert default_target_layers(model) == [name]
    layers = gc.resolve_target_layers(model)
    assert len(layers) == 1 and layers[0] is get(model)
    # the layer is spatial (after the family's reshape transform) and a Grad-CAM map comes out
    x = torch.randn(2, 3, 64, 64)
    seen = []
    h = layers[0].register_forward_hook(lambda mod, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    rt = reshape_transform_for(model, tuple(x.shape))
    act = rt(seen[0]) if rt is not None else seen[0]
    assert act.dim() == 4 and act.shape[0] == 2 and act.shape[-1] >= 2, (family, tuple(act.shape))
    if family.startswith("timm-efficientnet") or family.startswith("timm-mobilenet"):
        assert hasattr(get(model), "act")  # bn2 is BatchNormAct2d: the last conv's activation
    check_maps(cam_maps(model, x, torch.tensor([0, 1]), "gradcam"), 2, 64, 64)
    assert hook_count(model) == 0


def test_explicit_target_layers_by_module_and_name():
    model = small_cnn().eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    a = cam_maps(model, x, y, "gradcam", target_layers=[model[2]])
    b = cam_maps(model, x, y, "gradcam", target_layers="2")
    torch.testing.assert_close(a, b)
    c = cam_maps(model, x, y, "gradcam")  # default: last conv, "3" at 8x8
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="no module named"):
        cam_maps(model, x, y, target_layers=["nope"])
    with pytest.raises(ValueError, match="not a module of"):
        cam_maps(model, x, y, target_layers=[nn.Conv2d(3, 3, 1)])
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        default_target_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_vit_reshape_drops_prefix_tokens():
    model = tiny_vit(reg_tokens=2)
    assert model.num_prefix_tokens == 3
    rt = reshape_transform_for(model, (2, 3, 64, 64))
    tokens = torch.randn(2, 3 + 16, 5)
    grid = rt(tokens)
    assert grid.shape == (2, 5, 4, 4)
    for i in range(4):
        for j in range(4):
            assert torch.equal(grid[:, :, i, j], tokens[:, 3 + 4 * i + j, :])
    with pytest.raises(ValueError, match="ViT reshape"):
        rt(torch.randn(2, 17, 5))


def test_patchnet_stitches_patch_maps_into_the_image():
    torch.manual_seed(0)
    net = PatchNet("resnet10t", 16, 3).eval()
    x = torch.randn(2, 3, 48, 32)
    stitch = reshape_transform_for(net, tuple(x.shape))
    assert torch.equal(stitch(net.patchify(x)), x)  # patch (i, j) back at its place
    with pytest.raises(ValueError, match="not defined for PatchNet"):
        cam_maps(net, x, torch.tensor([0, 1]), "ablationcam")
    assert hook_count(net) == 0


# --- the model is left as it was ------------------------------------------------------------------------

def _messy(model):
    """Mixed training flags, some frozen parameters, an existing .grad."""
    model.train()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    model[8].weight.grad = torch.full_like(model[8].weight, 7.0)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged(method):
    model = _messy(small_cnn())
    before = snapshot(model)
    assert before["hooks"] == 0
    out = cam_maps(model, torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]), method, batch_size=2)
    check_maps(out, 3, 16, 16)
    assert_unchanged(model, before)
    assert model.training and not model[1].training and model[8].weight.grad.eq(7).all()


def test_user_hooks_are_kept():
    model = small_cnn().eval()
    calls = []
    h = model[4].register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(model)
    cam_maps(model, torch.randn(1, 3, 16, 16), torch.tensor([1]), "ablationcam", target_layers="4")
    assert_unchanged(model, before)
    assert calls  # the user's hook stayed active
    h.remove()
    assert hook_count(model) == 0


class Bomb(nn.Module):
    """Identity that raises on its ``fuse``-th call."""

    def __init__(self, fuse):
        super().__init__()
        self.fuse, self.calls = fuse, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fuse:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("method,fuse", [("gradcam", 1), ("layercam", 1), ("eigencam", 1),
                                         # AblationCAM: 2 = its own activation hook is registered
                                         # (grad-cam leaks it on error), 3 = the target layer is
                                         # swapped out for the ablation layer
                                         ("ablationcam", 2), ("ablationcam", 3)])
def test_model_unchanged_after_exception(method, fuse):
    model = _messy(small_cnn())
    model[5] = Bomb(fuse)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        cam_maps(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), method, target_layers="4")
    assert model[5].calls == fuse
    assert_unchanged(model, before)
    assert not any(type(m).__name__.startswith("AblationLayer") for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam", "ablationcam"])
def test_model_unchanged_after_bad_label(method):
    model = _messy(small_cnn(k=3))
    before = snapshot(model)
    with pytest.raises(IndexError):  # label 5 >= K = 3, raised inside grad-cam with hooks registered
        cam_maps(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 5]), method)
    assert_unchanged(model, before)


# --- a planted answer -----------------------------------------------------------------------------------

class SquareDetector(nn.Module):
    """Fixed weights. Filter 0 is a 3x3 mean minus 0.5: after the ReLU it is positive only where a
    3x3 window is mostly bright (inside a filled square, not on a 1-px bar). Filter 1 is zero.
    Class-1 logit = global average of filter 0's activation; class-0 logit = that of filter 1 (= 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] = 1 / 9
            self.conv.bias.copy_(torch.tensor([-0.5, 0.0]))
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def planted_images():
    torch.manual_seed(0)
    x = 0.05 * torch.randn(2, 1, 32, 32)
    squares = torch.zeros(2, 32, 32, dtype=torch.bool)
    squares[0, 18:24, 5:11] = True
    squares[1, 4:10, 20:26] = True
    x[:, 0][squares] = 1.0
    x[0, 0, 5, 14:30] = 1.0  # bright 1-px bars: distractors the filter ignores
    x[1, 0, 14:31, 8] = 1.0
    return x, squares


def _argmax_in(maps, squares):
    idx = maps.flatten(1).argmax(1)
    return squares.flatten(1).gather(1, idx[:, None]).squeeze(1)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "ablationcam"])
def test_planted_square(method):
    model = SquareDetector().eval()
    x, squares = planted_images()
    assert model(x)[:, 1].gt(0).all()
    out = cam_maps(model, x, torch.tensor([1, 1]), method, target_layers="act")
    assert _argmax_in(out, squares).all()
    assert out[~squares].max() < 0.5  # away from the square (blurred edge aside) the map is low


def test_planted_square_default_layer():
    model = SquareDetector().eval()
    assert default_target_layers(model) == ["conv"]  # fallback: last nn.Conv2d
    x, squares = planted_images()
    assert _argmax_in(cam_maps(model, x, torch.tensor([1, 1]), "gradcam"), squares).all()


@pytest.mark.parametrize("method", ["gradcam", "ablationcam"])
def test_constant_and_undefined_maps_are_zero(method):
    # class 0 reads the all-zero filter: Grad-CAM's map is constant; AblationCAM divides by the
    # target score 0 (0/0 = NaN in grad-cam)
    model = SquareDetector().eval()
    x, _ = planted_images()
    out = cam_maps(model, x, torch.tensor([0, 0]), method, target_layers="act")
    assert torch.isfinite(out).all() and out.eq(0).all()


def test_non_finite_maps_become_zero(monkeypatch):
    from pytorch_grad_cam import GradCAM

    class HalfNaN(GradCAM):
        def __call__(self, input_tensor, targets, **kw):
            out = super().__call__(input_tensor, targets, **kw)
            out[0, 0, 0] = float("nan")
            return out

    monkeypatch.setitem(gc._METHODS, "halfnan", (HalfNaN, None))
    model = SquareDetector().eval()
    x, squares = planted_images()
    out = cam_maps(model, x, torch.tensor([1, 1]), "halfnan", target_layers="act", batch_size=2)
    assert out[0].eq(0).all()  # any NaN: the whole map is undefined -> zeros
    assert out[1].max() > 0.99 and _argmax_in(out[1:], squares[1:]).all()


# --- top_k_mask -----------------------------------------------------------------------------------------

def test_top_k_mask_counts_and_values():
    torch.manual_seed(0)
    s = torch.rand(4, 2, 5)  # 10 pixels, distinct values
    area = torch.tensor([0.0, 0.25, 0.5, 1.0])
    m = top_k_mask(s, area)
    assert m.dtype == torch.bool and m.shape == s.shape
    assert m.flatten(1).sum(1).tolist() == [0, 2, 5, 10]  # 2.5 floors to 2: never above the area
    for i, k in enumerate([0, 2, 5, 10]):
        expect = torch.zeros(10, dtype=torch.bool)
        expect[s[i].flatten().topk(k).indices] = True
        assert torch.equal(m[i].flatten(), expect)
    assert top_k_mask(s, 0.3).flatten(1).sum(1).tolist() == [3] * 4
    assert top_k_mask(s, torch.tensor(0.7)).flatten(1).sum(1).tolist() == [7] * 4


def test_top_k_pixel_count_rule():
    # floor (a mask never exceeds its area), at least one pixel for any area > 0, and float64
    # rounding of a*HW absorbed (0.57 * 100 = 56.99999999999999 in float64)
    s = torch.rand(1, 10, 10)
    assert top_k_mask(s, 0.57).sum().item() == 57
    assert top_k_mask(s, 0.001).sum().item() == 1 and top_k_mask(s, 0.0).sum().item() == 0
    assert top_k_mask(s, 0.999).sum().item() == 99


def test_top_k_mask_ties_are_row_major():
    flat = torch.zeros(2, 3, 4)
    m = top_k_mask(flat, 0.25)  # k = 3 of 12, all equal: the first three pixels
    assert m.flatten(1)[:, :3].all() and not m.flatten(1)[:, 3:].any()
    s = torch.tensor([[[1.0, 0.5, 0.5], [0.5, 0.5, 0.0]]])
    m = top_k_mask(s, 0.5)  # k = 3: the 1.0, then the first two 0.5s in row-major order
    assert m.tolist() == [[[True, True, True], [False, False, False]]]
    m = top_k_mask(s.transpose(1, 2).contiguous(), 0.5)  # [3, 2]: values 1, .5 / .5, .5 / .5, 0
    assert m.tolist() == [[[True, True], [True, False], [False, False]]]
    # many ties (three levels on 12x12): the reference order is (value descending, index ascending)
    torch.manual_seed(0)
    s = torch.randint(0, 3, (2, 12, 12)).float()
    m = top_k_mask(s, 0.4)
    for i in range(2):
        vals = s[i].flatten().tolist()
        keep = sorted(range(144), key=lambda j: (-vals[j], j))[:57]  # 0.4 * 144 = 57.6 -> 57
        expect = torch.zeros(144, dtype=torch.bool)
        expect[keep] = True
        assert torch.equal(m[i].flatten(), expect)


def test_top_k_mask_bad_inputs():
    s = torch.rand(2, 4, 4)
    for bad in (torch.rand(4, 4), torch.rand(1, 2, 4, 4)):
        with pytest.raises(ValueError, match=r"\[N, H, W\]"):
            top_k_mask(bad, 0.5)
    for area in (1.5, -0.1, float("nan"), torch.tensor([0.5, 2.0])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            top_k_mask(s, area)
    with pytest.raises(ValueError, match="tensor \\[N\\]"):
        top_k_mask(s, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError):
        top_k_mask(s, "half")
    nan = s.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_k_mask(nan, 0.5)


# --- cam_maps input checks ------------------------------------------------------------------------------

def test_cam_maps_bad_inputs():
    model = small_cnn().eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam_maps(model, x, y, "scorecam")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        cam_maps(model, x[0], y)
    with pytest.raises(ValueError, match="label"):
        cam_maps(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label"):
        cam_maps(model, x, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="integer"):
        cam_maps(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        cam_maps(model, x, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="batch_size"):
        cam_maps(model, x, y, batch_size=0)
    assert hook_count(model) == 0
    assert cam_maps(model, x[:0], y[:0]).shape == (0, 16, 16)

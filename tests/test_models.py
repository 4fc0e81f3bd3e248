"""The classifier adapter: default layers per family, weights, freezing, thread-local hooks."""
import threading

import pytest
import timm
import torch
import torchvision
from torch import nn

from medcam_fast.models import ActivationCapture, FrozenClassifier, default_layers, default_weights, frozen


@pytest.mark.parametrize("name, expect", [
    ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("mobilenetv2_100", ["bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("efficientnet_b0", ["bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"]),
])
def test_timm_cnn_layers(name, expect):
    assert default_layers(timm.create_model(name, pretrained=False, num_classes=3)) == expect


def test_timm_vit_layers_and_token_maps():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64)
    layers = default_layers(vit)
    assert layers == [f"blocks.{i}" for i in range(12)]
    clf = FrozenClassifier(vit)
    x = torch.rand(2, 3, 64, 64)
    with clf.session(x), torch.no_grad():
        logits, feats = clf.forward(x, with_activations=True)
    assert logits.shape == (2, 3) and feats[0].shape == (2, 192, 4, 4)  # cls token dropped, 4x4 grid


@pytest.mark.parametrize("builder, expect", [
    (torchvision.models.resnet18, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    (torchvision.models.mobilenet_v2, ["features.0", "features.1", "features.3", "features.6", "features.13",
                                       "features.18"]),
    (torchvision.models.efficientnet_b0, ["features.0", "features.1", "features.2", "features.3", "features.5",
                                          "features.8"]),
    (torchvision.models.convnext_tiny, ["features.1", "features.3", "features.5", "features.7"]),
])
def test_torchvision_layers(builder, expect):
    assert default_layers(builder(weights=None, num_classes=3)) == expect


def test_unknown_model_falls_back_to_resolution_changes():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert default_layers(net, torch.zeros(1, 1, 32, 32)) == ["1", "4", "5"]


def test_weights_grow_with_depth_and_override_by_name():
    assert default_weights(5) == [1, 2, 2, 4, 8]
    w = default_weights(4)
    assert w[0] == 1 and w[-1] == pytest.approx(8) and w == sorted(w)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    clf = FrozenClassifier(model, weights={"layer4": 3.0})
    clf.prepare(torch.zeros(1, 3, 32, 32))
    assert clf.weights == [1, 2, 2, 4, 3.0]
    with pytest.raises(ValueError, match="not matched"):
        FrozenClassifier(model, layers=["layer1"], weights={"layer9": 1.0})
    with pytest.raises(ValueError, match="2 layer weights for 1"):
        FrozenClassifier(model, layers=["layer1"], weights=[1.0, 2.0])


def test_frozen_restores_exactly_and_nests():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2))
    model.train()
    model[1].eval()
    model[2].bias.requires_grad_(False)
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with frozen(model):
        with frozen(model):
            assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())  # the outer use still holds
    assert [m.training for m in model.modules()] == flags and [p.requires_grad for p in model.parameters()] == grads


def test_hooks_are_thread_local():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    cap = ActivationCapture(model, ["1"])
    results, errors = {}, []

    def run(i):
        try:
            x = torch.full((1, 1, 4, 4), float(i))
            for _ in range(20):
                with cap.recording() as store:
                    model(x)
                expect = torch.relu(model[0](x))
                assert torch.equal(store["1"], expect)
            results[i] = True
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with cap, torch.no_grad():
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 4
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0

"""The bundled demo classifier and samples: what ships matches what its model card says."""
import torch

from medcam_fast import zoo
from medcam_fast.data import samples


def test_demo_loads_with_its_preprocessing():
    model, prep, names = zoo.load_demo()
    assert names == ["glioma", "meningioma", "pituitary"] and not model.training
    x = prep(samples()[0].path)
    assert x.shape == (1, 128, 128) and x.dtype == torch.float32
    assert (zoo.WEIGHTS_DIR / "brain_mri_mobilenetv2.safetensors").stat().st_size <= 15e6


def test_demo_reproduces_its_cards_sample_predictions():
    model, prep, _ = zoo.load_demo()
    card = zoo.card()
    recorded = {r["name"]: r for r in card["sample_predictions"]}
    items = samples()
    assert len(items) <= 8 and set(recorded) == {s.name for s in items}
    with torch.no_grad():
        probs = model(torch.stack([prep(s.path) for s in items])).softmax(1)
    for s, p in zip(items, probs):
        r = recorded[s.name]
        assert int(p.argmax()) == r["predicted"] and s.label == r["label"]
        torch.testing.assert_close(p, torch.tensor(r["probabilities"]), atol=1e-4, rtol=0)


def test_card_states_data_licence_and_accuracy():
    card = zoo.card()
    assert "CC BY 4.0" in card["dataset"]["licence"] and "figshare" in card["dataset"]["source"]
    # no hub weights: trained from scratch here, or fine-tuned from weights that were
    lineage = card["training"]["from_scratch"] or card["previous"]["training"]["from_scratch"]
    assert card["metrics"]["test"]["accuracy"] >= 0.85 and lineage
    assert "slice" in card["dataset"]["caveat"]

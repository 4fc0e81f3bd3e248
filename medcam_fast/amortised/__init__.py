"""Amortised Med-CAM: one class-conditional explainer network trained over a data set against a
frozen classifier, masks in one pass (checked by the same sufficiency test), per-image refinement
on demand (``Explainer(model, amortised=path, refine=K)``).

    from medcam_fast.amortised import train_explainer, save, load
    amortised = train_explainer(model, train_images)         # [M,C,H,W]
    save(amortised, "explainer.safetensors")
    Explainer(model, amortised="explainer.safetensors")(x)
"""
from .figures import explainer_figures
from ..medcam.amortised_net import ConditionalUNet
from ..medcam.amortised_store import AmortisedExplainer, classifier_fingerprint, load, resolve, save
from .training import AmortisedRecipe, train_explainer

__all__ = ["AmortisedExplainer", "AmortisedRecipe", "ConditionalUNet", "classifier_fingerprint",
           "explainer_figures", "load", "resolve", "save", "train_explainer"]

"""Baseline saliency methods that medcam_fast is compared against."""
from .gradcam import (available_methods, cam_maps, default_target_layers, get_method, register_method,
                      register_target_layers, reshape_transform_for, resolve_target_layers, top_k_mask)

__all__ = ["available_methods", "cam_maps", "default_target_layers", "get_method", "register_method",
           "register_target_layers", "reshape_transform_for", "resolve_target_layers", "top_k_mask"]

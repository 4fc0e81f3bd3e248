"""Baseline saliency methods that medcam_fast is compared against."""

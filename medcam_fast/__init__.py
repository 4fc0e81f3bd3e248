"""medcam_fast: minimal binary evidence that keeps a medical image classifier's decision."""
from ._ext import build_info
from ._version import __version__
from .medcam import Explainer, ExplainerService, Explanation, MedCAMConfig, explain, paper_config, reference_config

__all__ = ["Explainer", "ExplainerService", "Explanation", "MedCAMConfig", "build_info", "explain", "paper_config",
           "reference_config", "__version__"]

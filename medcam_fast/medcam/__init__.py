"""Med-CAM: the config, the U-Net, the losses, the fit loops, the sufficiency test, verification and
the Explainer."""
from . import sufficiency
from .config import CheckConfig, FitConfig, MedCAMConfig, PriorConfig, paper_config, plain_config, reference_config
from .explainer import Explainer, explain
from .result import Explanation
from .service import ExplainerService

__all__ = ["sufficiency", "Explainer", "ExplainerService", "Explanation", "MedCAMConfig", "FitConfig", "PriorConfig",
           "CheckConfig", "explain", "plain_config", "paper_config", "reference_config"]

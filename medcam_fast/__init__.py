"""medcam_fast: minimal binary evidence that keeps a medical image classifier's decision."""
from ._ext import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__"]

from ray_ad.methods.costfilter.config import CostFilterConfig
from ray_ad.methods.costfilter.model import CostFilter

__all__ = ["CostFilter", "CostFilterConfig"]
